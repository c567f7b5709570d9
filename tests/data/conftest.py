"""Shared-data location for reader tests (skipped cleanly when the folder is absent)."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("benchmark data folder ../shared/data is not present")
    return SHARED_DATA.resolve()
