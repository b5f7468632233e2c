"""Aggregate per-layer codec tables into the workflow's result tables.

Inputs follow docs/tables.md (one row per model x ctx x codec x layer x stream). Outputs:

``results/metrics.parquet``
    every codec table concatenated, sorted by (model, ctx, codec, layer, stream), plus
    ``layer_ratio`` (baseline/bytes of the row) and the cell-level ``total_ratio`` and
    ``full_ratio`` broadcast onto each row.
``results/timings.parquet``
    every timing table concatenated (not deterministic; kept apart on purpose).
``results/summary.parquet``
    one row per (model, ctx, codec): byte totals, the two ratios of spec kakeya.md §1.7, the
    legacy-convention ratios, and error summaries over the layers the codec compressed. When the
    codec tables carry the attention columns (``attn_kl``, ``attn_top1``, ``attn_top8``,
    ``attn_out_rel_err``: one value per layer, repeated on its K and V rows), also
    ``attn_n_layers`` (layers with a value among those the codec compresses on K or V),
    ``attn_<metric>_mean`` over those layers and ``attn_kl_max`` (NaN for cells whose tables
    predate the columns).

Ratios (spec kakeya.md §1.7):

- ``full_ratio``  = sum of baseline bytes of full-attention layers / sum of the codec's bytes of
  those layers (every byte category, so a full layer a codec leaves alone counts as passthrough).
- ``total_ratio`` = sum of baseline bytes of every cached layer / sum of every stored byte,
  passthrough included (Gemma's sliding layers count at baseline size for codecs that skip them).
- ``legacy_<name>_{total,full}_ratio`` = the same sums with the legacy byte column in place of
  ``bytes_total`` wherever it is defined (rows where it is NaN count at their honest bytes); NaN
  when the cell has no value in that column.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from kvbench.codecs.base import BYTE_FIELDS
from kvbench.errors import KvbenchError

KEYS = ["model", "ctx", "codec", "layer", "stream"]
CELL = ["model", "ctx", "codec"]
BYTE_COLUMNS = [f"bytes_{f}" for f in BYTE_FIELDS]
REQUIRED = [
    "model",
    "codec",
    "family",
    "stream_codec",
    "ctx",
    "layer",
    "layer_type",
    "stream",
    "n_kv",
    "tokens",
    "head_dim",
    "compressed",
    "baseline_bytes",
    *BYTE_COLUMNS,
    "bytes_total",
    "bits_per_value",
    "mse",
    "rel_mse",
    "max_abs_err",
    "cos_sim",
    "ip_rel_err",
]
ERROR_METRICS = ("rel_mse", "mse", "cos_sim", "max_abs_err", "ip_rel_err")
#: Per-layer attention columns of the codec tables (kvbench.attention.ATTN_COLUMNS, less the count).
ATTN_METRICS = ("attn_kl", "attn_top1", "attn_top8", "attn_out_rel_err")


def legacy_columns(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith("legacy_"))


def legacy_conventions(df: pd.DataFrame) -> list[str]:
    """Legacy columns that are whole byte conventions, not breakdowns of one.

    ``legacy_kt_skeleton_bytes`` is a part of ``legacy_kt_bytes`` (same stem ``legacy_kt``) and is
    left out; ``legacy_f32_store`` and ``legacy_bf16_projection`` are conventions.
    """
    cols = legacy_columns(df)
    wholes = [c for c in cols if c.endswith("_bytes")]
    return [
        c
        for c in cols
        if not any(c != w and c.startswith(w.removesuffix("_bytes") + "_") for w in wholes)
    ]


def legacy_names(df: pd.DataFrame) -> list[str]:
    """Legacy conventions present in a table (``legacy_bf16_projection`` -> ``bf16_projection``)."""
    return [c.removeprefix("legacy_") for c in legacy_conventions(df)]


def check_codec_table(df: pd.DataFrame, source: str = "table") -> None:
    """Fail with a message naming ``source`` when a codec table breaks the contract."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise KvbenchError(f"{source}: missing column(s) {missing} (contract: docs/tables.md)")
    dup = df.duplicated(KEYS)
    if dup.any():
        first = df.loc[dup, KEYS].iloc[0].to_dict()
        raise KvbenchError(f"{source}: duplicate row for {first}")
    total = df[BYTE_COLUMNS].sum(axis=1)
    bad = total != df["bytes_total"]
    if bad.any():
        row = df.loc[bad, KEYS].iloc[0].to_dict()
        raise KvbenchError(f"{source}: bytes_total != sum of byte categories at {row}")


def _sort(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def concat_tables(paths: Iterable[str | Path], check: bool = True) -> pd.DataFrame:
    """Read and concatenate Parquet tables (deterministic order, checked against the contract)."""
    frames = []
    for p in sorted(str(p) for p in paths):
        df = pd.read_parquet(p)
        if check:
            check_codec_table(df, p)
        frames.append(df)
    if not frames:
        raise KvbenchError("no codec tables to aggregate (is the model x ctx x codec grid empty?)")
    return pd.concat(frames, ignore_index=True)


def _with_legacy_fallback(df: pd.DataFrame, col: str) -> pd.Series:
    return df[col].where(df[col].notna(), df["bytes_total"].astype(float))


def _ratio(num, den) -> float:
    return float(num) / float(den) if den else math.nan


def _div(num: pd.Series, den: pd.Series) -> pd.Series:
    return num.astype(float) / den.astype(float).where(den != 0)


def cell_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, ctx, codec): total and full-attention ratios (spec §1.7) + legacy variants."""
    full = df["layer_type"] == "full"
    cols = {
        "_b": df["baseline_bytes"],
        "_t": df["bytes_total"],
        "_bf": df["baseline_bytes"].where(full, 0),
        "_tf": df["bytes_total"].where(full, 0),
    }
    convs = legacy_conventions(df)
    for col in convs:
        filled = _with_legacy_fallback(df, col)
        cols[f"_l{col}"] = filled
        cols[f"_lf{col}"] = filled.where(full, 0.0)
        cols[f"_n{col}"] = df[col].notna().astype(int)
        cols[f"_nf{col}"] = (df[col].notna() & full).astype(int)
    d = pd.DataFrame({**{k: df[k] for k in CELL}, **cols})
    g = d.groupby(CELL, sort=True).sum()
    out = pd.DataFrame(index=g.index)
    out["total_ratio"] = _div(g["_b"], g["_t"])
    out["full_ratio"] = _div(g["_bf"], g["_tf"])
    for col in convs:
        name = col.removeprefix("legacy_")
        out[f"legacy_{name}_total_ratio"] = _div(g["_b"], g[f"_l{col}"]).where(g[f"_n{col}"] > 0)
        out[f"legacy_{name}_full_ratio"] = _div(g["_bf"], g[f"_lf{col}"]).where(g[f"_nf{col}"] > 0)
    return out.reset_index()


def build_metrics(tables: pd.DataFrame) -> pd.DataFrame:
    """The concatenated codec tables + ``layer_ratio`` + the broadcast cell ratios."""
    df = _sort(tables, KEYS)
    df["layer_ratio"] = df["baseline_bytes"] / df["bytes_total"].where(df["bytes_total"] > 0)
    ratios = cell_ratios(df)[CELL + ["total_ratio", "full_ratio"]]
    out = df.merge(ratios, on=CELL, how="left", validate="many_to_one")
    legacy = legacy_columns(out)
    fixed = [c for c in out.columns if c not in legacy]
    return _sort(out[fixed + legacy], KEYS)


def build_timings(tables: pd.DataFrame) -> pd.DataFrame:
    return _sort(tables, [k for k in KEYS if k in tables.columns])


def _stream_summary(m: pd.DataFrame, stream: str, index: pd.MultiIndex) -> pd.DataFrame:
    s = m[(m["stream"] == stream) & m["compressed"].astype(bool)]
    g = s.groupby(CELL, sort=True)
    out = pd.DataFrame(index=index)
    out[f"{stream}_n_compressed"] = g.size().reindex(index, fill_value=0).astype(int)
    values = (s["n_kv"] * s["tokens"] * s["head_dim"]).groupby([s[k] for k in CELL]).sum()
    out[f"{stream}_bpv_compressed"] = (8.0 * g["bytes_total"].sum() / values).reindex(index)
    for metric in ERROR_METRICS:
        if metric == "max_abs_err":
            out[f"{stream}_{metric}_max"] = g[metric].max().reindex(index)
        else:
            out[f"{stream}_{metric}_mean"] = g[metric].mean().reindex(index)
    out[f"{stream}_rel_mse_median"] = g["rel_mse"].median().reindex(index)
    valid = s[s["rel_mse"].notna()]
    worst = valid.loc[valid.groupby(CELL, sort=True)["rel_mse"].idxmax()].set_index(CELL)
    out[f"{stream}_worst_layer"] = worst["layer"].reindex(index).fillna(-1).astype(int)
    out[f"{stream}_worst_layer_type"] = worst["layer_type"].astype(object).reindex(index).fillna("")
    out[f"{stream}_worst_rel_mse"] = worst["rel_mse"].reindex(index)
    names = g["stream_codec"].agg(lambda x: "+".join(sorted(set(x))))
    out[f"{stream}_codec"] = names.astype(object).reindex(index).fillna("passthrough")
    f = m[(m["stream"] == stream) & (m["layer_type"] == "full")].groupby(CELL, sort=True)
    out[f"{stream}_full_ratio"] = _div(f["baseline_bytes"].sum(), f["bytes_total"].sum()).reindex(
        index
    )
    return out


def _attention_summary(m: pd.DataFrame, index: pd.MultiIndex) -> pd.DataFrame:
    """Layer means of the attention metrics over the layers a codec compresses (K or V).

    The metrics are properties of a layer (the same value on its K and V rows), so each layer
    counts once. Layers without a value (no captured queries, or a table older than the
    columns) are left out; ``attn_n_layers`` says how many counted.
    """
    out = pd.DataFrame(index=index)
    if not all(c in m.columns for c in ATTN_METRICS):
        return out
    per_layer = m.groupby(CELL + ["layer"], sort=True).agg(
        compressed=("compressed", "any"), **{c: (c, "first") for c in ATTN_METRICS}
    )
    per_layer = per_layer[per_layer["compressed"] & per_layer["attn_kl"].notna()]
    g = per_layer.reset_index().groupby(CELL, sort=True)
    out["attn_n_layers"] = g.size().reindex(index, fill_value=0).astype(int)
    for c in ATTN_METRICS:
        out[f"{c}_mean"] = g[c].mean().reindex(index)
    out["attn_kl_max"] = g["attn_kl"].max().reindex(index)
    return out


def build_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, ctx, codec); see the module docstring for the ratio definitions."""
    m = metrics
    g = m.groupby(CELL, sort=True)
    out = g.agg(
        family=("family", "first"),
        baseline_bytes_total=("baseline_bytes", "sum"),
        bytes_total=("bytes_total", "sum"),
        **{c: (c, "sum") for c in BYTE_COLUMNS},
    )
    index = out.index
    full = m[m["layer_type"] == "full"].groupby(CELL, sort=True)
    out["baseline_bytes_full"] = full["baseline_bytes"].sum().reindex(index, fill_value=0)
    out["bytes_full"] = full["bytes_total"].sum().reindex(index, fill_value=0)
    layers = m.drop_duplicates(CELL + ["layer"])
    lg = layers.groupby(CELL, sort=True)
    out["n_layers"] = lg.size()
    out["n_full_layers"] = lg["layer_type"].agg(lambda x: int((x == "full").sum()))
    out["n_sliding_layers"] = lg["layer_type"].agg(lambda x: int((x == "sliding").sum()))
    values = (m["n_kv"] * m["tokens"] * m["head_dim"]).groupby([m[k] for k in CELL]).sum()
    out["bits_per_value"] = 8.0 * out["bytes_total"] / values
    ratios = cell_ratios(m).set_index(CELL)
    streams = [_stream_summary(m, s, index) for s in ("k", "v")]
    attn = _attention_summary(m, index)
    out = pd.concat([out, ratios, *streams, attn], axis=1).reset_index()
    for c in [
        "baseline_bytes_total",
        "baseline_bytes_full",
        "bytes_total",
        "bytes_full",
        *BYTE_COLUMNS,
    ]:
        out[c] = out[c].astype("int64")
    first = CELL + [
        "family",
        "k_codec",
        "v_codec",
        "n_layers",
        "n_full_layers",
        "n_sliding_layers",
        "baseline_bytes_total",
        "baseline_bytes_full",
        "bytes_total",
        "bytes_full",
        *BYTE_COLUMNS,
        "bits_per_value",
        "total_ratio",
        "full_ratio",
    ]
    legacy = sorted(c for c in out.columns if c.startswith("legacy_"))
    rest = [c for c in out.columns if c not in first and c not in legacy]
    return _sort(out[first + rest + legacy], CELL)


def aggregate(
    codec_tables: Iterable[str | Path], timing_tables: Iterable[str | Path] = ()
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read every codec/timing table; return (metrics, summary, timings)."""
    metrics = build_metrics(concat_tables(codec_tables))
    summary = build_summary(metrics)
    timing_paths = list(timing_tables)
    timings = (
        build_timings(concat_tables(timing_paths, check=False))
        if timing_paths
        else pd.DataFrame(columns=KEYS + ["encode_s", "decode_s", "backend"])
    )
    return metrics, summary, timings
