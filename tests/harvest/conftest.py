"""Make `harvest`, `cache`, `settings` and the shared `tiny_models` helpers importable however
pytest is invoked (`.venv/bin/pytest` does not put the repository root on sys.path by itself).
Shared by the text-side and run-side harvest tests: keep fixtures in the test files themselves."""

import sys
from pathlib import Path

for _p in (Path(__file__).resolve().parents[2], Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
