"""Regression gates, free of pytest: ``performance`` (a bench row against a baseline row, calibrated, with the
re-measure rule) and ``accuracy`` (C-Eval accuracies against a baseline run). The pytest plugins only wire them
to cases and the terminal summary; baseline storage is npuinfer.gates.baseline_store."""
