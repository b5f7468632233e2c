"""Atomic, deterministic Parquet I/O for every table the workflow writes."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvbench.shards import atomic_write_bytes


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` to ``path`` atomically; same data -> same bytes (no index, fixed options)."""
    buf = io.BytesIO()
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    pq.write_table(table, buf, compression="zstd", write_statistics=False)
    atomic_write_bytes(path, buf.getvalue())


def read_parquet(path: str | Path) -> pd.DataFrame:
    return pd.read_parquet(path)
