"""Reports that read finished runs of both suites: two-run comparison (``npuinfer compare``)."""
