"""The results-of-record comparison: tolerances and missing rows."""

import pandas as pd

from kvbench.regress import KEYS, compare_tables


def _table(bytes_total=1000, mse=0.5):
    return pd.DataFrame(
        [
            {
                "model": "m",
                "ctx": 2048,
                "codec": "c",
                "layer": 0,
                "stream": "k",
                "bytes_total": bytes_total,
                "mse": mse,
                "cos_sim": float("nan"),
            }
        ]
    )


def test_identical_and_within_tolerance():
    assert compare_tables(_table(), _table(), KEYS) == []
    assert compare_tables(_table(1000, 0.5), _table(1004, 0.504), KEYS) == []


def test_byte_and_error_drift_are_reported():
    assert any("bytes_total" in p for p in compare_tables(_table(1000), _table(1006), KEYS))
    assert any("mse" in p for p in compare_tables(_table(mse=0.5), _table(mse=0.506), KEYS))


def test_missing_rows_are_reported():
    extra = pd.concat([_table(), _table().assign(layer=1)])
    assert any("missing from the new run" in p for p in compare_tables(extra, _table(), KEYS))
