"""Figures: matplotlib on a backend without a display, loaded only when a figure is drawn (so a
stage that draws nothing never imports it), and written atomically like every artifact."""

from __future__ import annotations

import os
from typing import Any

from pipeline.artifacts import atomic_path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, path: str | os.PathLike, **savefig: Any) -> None:
    """Write `fig` as a PNG and close it; `savefig` overrides the defaults (110 dpi, tight bounding box,
    no software version in the metadata, so the same figure gives the same bytes)."""
    options = {"dpi": 110, "bbox_inches": "tight", "metadata": {"Software": None}, **savefig}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **options)
    pyplot().close(fig)
