"""Training: the one loop (``loop``), the ``Learner`` it optimizes, checkpoints, the health monitor, FSDP helpers."""
