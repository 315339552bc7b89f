"""Retrieval: an embedding index of a shard set (``index``), the CLIP loader that fills and queries it
(``clip``), and the ``selfsup retrieve`` command (``retrieve``)."""
