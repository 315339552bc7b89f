"""Objectives, one per file (``mlm``, ``mae``, ``data2vec``, ``clip``): each holds ``Config`` and
``Objective`` (see ``pipeline.objective``). Found by file name through ``pipeline.registry``."""
