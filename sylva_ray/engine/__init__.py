"""The Ray-free engine: configuration resolution, the run directory, the worker-side job protocol,
one client's work, Phase 1's round loop, Phase 2 across clients, checks before a run, and the
runner that calls Phase 1 then Phase 2. Imports ``base`` and ``method``; never ``ray``."""
