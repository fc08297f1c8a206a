"""Root of the test tree. Its presence puts ``tests/`` on ``sys.path`` (pytest's rootdir conftest),
so shared helpers (``run_fixtures``: a tiny prepared dataset, tiny run configs) import by name from
any test directory."""
