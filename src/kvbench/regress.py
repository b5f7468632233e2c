"""Compare a fresh run's tables with the committed results of record.

    python -m kvbench.regress RECORD_DIR NEW_DIR

Byte columns may differ by at most 0.5 % and error metrics by 1 % (relative, with a small
absolute floor for values that are ~0); anything else (missing rows, changed keys) fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

KEYS = ["model", "ctx", "codec", "layer", "stream"]
BYTE_TOL = 0.005
ERROR_TOL = 0.01
ABS_FLOOR = 1e-9


def _is_byte_column(col: str) -> bool:
    return col.startswith(("bytes_", "legacy_")) or col == "baseline_bytes"


def compare_tables(record: pd.DataFrame, new: pd.DataFrame, keys: list[str]) -> list[str]:
    """Human-readable differences beyond tolerance (empty list = same results)."""
    problems = []
    merged = record.merge(new, on=keys, how="outer", suffixes=("_rec", "_new"), indicator=True)
    for side, label in (("left_only", "missing from the new run"), ("right_only", "new")):
        extra = merged[merged["_merge"] == side]
        if len(extra):
            problems.append(f"{len(extra)} rows {label}: {extra[keys].head(3).to_dict('records')}")
    both = merged[merged["_merge"] == "both"]
    for col in record.columns:
        if col in keys or col not in new.columns or not pd.api.types.is_numeric_dtype(record[col]):
            continue
        a = both[f"{col}_rec"].to_numpy(dtype=float)
        b = both[f"{col}_new"].to_numpy(dtype=float)
        tol = BYTE_TOL if _is_byte_column(col) else ERROR_TOL
        same_nan = np.isnan(a) & np.isnan(b)
        bad = ~same_nan & ~(np.abs(a - b) <= tol * np.abs(a) + ABS_FLOOR)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            row = both.iloc[i][keys].to_dict()
            problems.append(
                f"{col}: {int(bad.sum())} values beyond {tol:.1%}; first at {row}: "
                f"record {a[i]!r} vs new {b[i]!r}"
            )
    return problems


def compare_dirs(record_dir: Path, new_dir: Path) -> list[str]:
    """Compare ``metrics.parquet`` (every codec cell) and the small summary tables."""
    problems = []
    for name, keys in (("metrics.parquet", KEYS),):
        rec, new = record_dir / name, new_dir / name
        if not rec.is_file():
            problems.append(f"{rec}: no results of record")
            continue
        if not new.is_file():
            problems.append(f"{new}: the new run did not produce it")
            continue
        problems += [
            f"{name}: {p}" for p in compare_tables(pd.read_parquet(rec), pd.read_parquet(new), keys)
        ]
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("record_dir", type=Path)
    ap.add_argument("new_dir", type=Path)
    args = ap.parse_args(argv)
    problems = compare_dirs(args.record_dir, args.new_dir)
    for p in problems:
        print(p)
    print("results match the record" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
