"""Put the repository root and the shared test helpers (tests/harvest, tests/train) on sys.path."""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
for _p in (_ROOT, _ROOT / "tests" / "harvest", _ROOT / "tests" / "train"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
