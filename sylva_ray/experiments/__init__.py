"""Experiments and reports on top of runs: ``compare`` (many algorithms and seeds) and its report,
the ``bench`` measurements, the sweep report, and the analysis API (``load_client_model``,
``load_client_split``)."""
