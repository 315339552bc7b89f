"""Evaluators, one per file (``knn``, ``linear_probe``, ``zero_shot``, ``retrieval``): each holds
``Config`` and ``evaluate`` over frozen feature arrays, returning ``base.Metric`` rows. The shared
contract lives in ``base`` (not an evaluator; the registry skips it). Found by file name through
``pipeline.registry``."""
