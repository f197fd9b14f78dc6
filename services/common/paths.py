"""Where the project finds its shared, read-only data (traces and GPU profiles).

``CHIRON_DATA_DIR`` overrides the default, which is ``../shared/data`` beside the repository
(see ``../shared/data/PROVENANCE.md`` for the source and licence of every file there).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """Directory holding ``traces/`` and ``profiles/``; raises FileNotFoundError with a fix when absent."""
    path = Path(os.environ.get("CHIRON_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared data directory {path} not found: set CHIRON_DATA_DIR to the folder holding "
            "traces/ and profiles/ (the repository expects it at ../shared/data)")
    return path
