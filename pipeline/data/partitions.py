"""Which files a source reads, the date of a hive partition (`date=YYYY-MM-DD`), and the files a
window of dates needs."""

from __future__ import annotations

import re
from datetime import date, timedelta
from pathlib import Path

from pipeline.config import SourceConfig, WindowConfig
from pipeline.errors import DataContractError

PARTITION = re.compile(r"(?:^|/)date=([^/]*)(?:/|$)")


def source_files(source: SourceConfig) -> list[Path]:
    """The files a source reads, in a stable order."""
    path = source.path
    if path.is_dir():
        suffix = ".parquet" if source.format == "parquet" else ".csv"
        return sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
    if any(ch in str(path) for ch in "*?["):
        anchor = Path(path.anchor or ".")
        return sorted(anchor.glob(str(path.relative_to(anchor))))
    return [path] if path.is_file() else []


def partition_date(path: Path | str) -> date | None:
    """The date of the `date=YYYY-MM-DD` folder a file sits in, None outside one; a `date=` folder
    that does not hold a date is an error naming it."""
    match = PARTITION.search(Path(path).as_posix())
    if not match:
        return None
    value = match.group(1)
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return date.fromisoformat(value)
    except ValueError:
        pass
    raise DataContractError(f"partition folder 'date={value}' of {path} is not a date (YYYY-MM-DD): rename or "
                            "remove it")


def window_files(source: SourceConfig, window: WindowConfig) -> tuple[list[Path] | None, date | None, date | None]:
    """The Parquet files a window needs (hive partitions outside it are not read) and its dates.

    `last_days` counts back from `until`, or from the newest date partition."""
    if source.format != "parquet" or window == WindowConfig():
        return None, window.since, window.until
    files = source_files(source)
    if not files and not source.path.exists():
        raise DataContractError(f"parquet source {source.path}: no such file or folder (data.events.path)")
    dated = [d for d in map(partition_date, files) if d is not None]
    until = window.until or (max(dated) if window.last_days and dated else None)
    since = window.since or (until - timedelta(days=window.last_days - 1) if window.last_days and until else None)
    keep = [f for f in files if (d := partition_date(f)) is None
            or ((since is None or d >= since) and (until is None or d <= until))]
    if not keep:
        raise DataContractError(f"parquet source {source.path}: no partition falls in the window "
                                f"{since or '…'} to {until or '…'}")
    return keep, since, until
