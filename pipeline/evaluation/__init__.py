"""What an evaluation produces beyond the evaluators' numbers: raw-input baselines (``baselines``),
the validated ``report.json`` and the self-contained ``report.html`` (``report``, ``plots``)."""
