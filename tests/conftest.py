"""Shared fixtures: paths to bundled data and to ../shared (tests needing it skip without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESOURCES = ROOT / "resources"
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_WET = RESOURCES / "commoncrawl" / "CC-MAIN-20201129214615-20201130004615-00404.head.warc.wet.gz"


@pytest.fixture
def sample_wet() -> Path:
    return SAMPLE_WET


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    return path
