"""Who registered each image in the sticky split registry (`<state_dir>/<name>/split_registry.parquet`):
the runs whose held-out images later runs compare champions on."""

from __future__ import annotations

from pathlib import Path

import polars as pl


def read_registered_by(path: Path) -> dict[str, str]:
    """image -> the run that registered it ("" for registries written before runs were recorded)."""
    if not path.is_file():
        return {}
    frame = pl.read_parquet(path)
    runs = frame["registered_by"].to_list() if "registered_by" in frame.columns else [""] * frame.height
    return dict(zip(frame["image_id"], [r or "" for r in runs], strict=True))


def registered_before(path: Path, run_id: str) -> set[str]:
    """The images a run other than `run_id` registered: the sticky held-out set as this run sees it,
    whether its split ran now or was adopted from another run folder (whose own view would name
    that run's predecessors instead). Images of registries without runs recorded count as earlier."""
    return {image for image, by in read_registered_by(path).items() if by != run_id or not run_id}
