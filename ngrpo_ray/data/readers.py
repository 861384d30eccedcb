"""Read a local json / jsonl / parquet file into a list of records (dicts)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_records(path: str | Path) -> list[Any]:
    """A .json file holds a list of records (or {"data": [...]}); .jsonl one record per line; .parquet a table.
    Rows that are not dicts are returned as they are: the loaders count them as bad rows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [_loads_or_none(line) for line in f if line.strip()]
    if suffix == ".json":
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if "data" in data and isinstance(data["data"], list):
                return data["data"]
            if len(lists) == 1:
                return lists[0]
            raise ValueError(f"{path}: a .json file must hold a list of records (or one list under a key)")
        return list(data)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported data file type {suffix!r} (expected .json, .jsonl or .parquet)")


def _loads_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None  # counted as a bad row by the caller
