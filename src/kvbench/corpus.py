"""Deterministic prompt token ids for capture (and the continuation after them, for quality stages).

Corpora:

- ``pydoc_topics`` (default): the English text of CPython's own documentation topics
  (``pydoc_data.topics.topics``, ~465k characters, 79 topics) in sorted-key order, joined with blank
  lines. Real, diverse prose available offline on every CPython install.
- ``repeated_paragraph``: the original study's protocol (spec kakeya.md §3.1): one ~510-character
  paragraph repeated until the context is filled. The paragraph text is **our reconstruction** of
  the shape described in the spec (its first sentence and its ending are from the spec; the middle
  is ours), so its tokens are not bit-identical to the original study's prompt.
- ``file:<path>``: a user's UTF-8 text file.

The text is tokenized with the tokenizer's default call (``tokenizer(text)["input_ids"]``, which
adds BOS when the tokenizer does; no chat template) and the first ``n_tokens`` ids are the prompt.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from kvbench.errors import KvbenchError

#: Our reconstruction of the original study's seed paragraph (kakeya.md §3.1).
REPEATED_PARAGRAPH = (
    "You are a careful technical writer. Please produce a long, self-contained explanation of "
    "how transformer key/value caches work during autoregressive decoding. Cover why keys and "
    "values are cached, how their memory grows with context length, layer count and head count, "
    "and how grouped-query and multi-query attention reduce it. Discuss sliding-window layers, "
    "quantisation and low-rank compression of the cache, and what each one costs in accuracy and "
    "speed. "
    "Include concrete numerical examples throughout.\n\n"
)

CORPORA = ("pydoc_topics", "repeated_paragraph", "file:<path>")


def pydoc_topics_text() -> str:
    """CPython's documentation topics in sorted-key order, joined with blank lines."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distro builds strip pydoc_data
        raise KvbenchError(
            "corpus 'pydoc_topics' needs the standard-library module pydoc_data "
            "(missing from this Python build); use corpus.name: file:<path> or repeated_paragraph"
        ) from e
    return "\n\n".join(topics[k].strip("\n") for k in sorted(topics))


def corpus_text(corpus_name: str, min_chars: int = 0) -> str:
    """The raw text of a corpus (``repeated_paragraph`` is repeated to at least ``min_chars``)."""
    if corpus_name == "pydoc_topics":
        return pydoc_topics_text()
    if corpus_name == "repeated_paragraph":
        reps = max(1, -(-max(min_chars, 1) // len(REPEATED_PARAGRAPH)))
        return REPEATED_PARAGRAPH * reps
    if corpus_name.startswith("file:"):
        path = Path(corpus_name[len("file:") :]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise KvbenchError(f"corpus {corpus_name!r}: cannot read {path} ({e.strerror})") from e
        except UnicodeDecodeError as e:
            raise KvbenchError(f"corpus {corpus_name!r}: {path} is not UTF-8 text ({e})") from e
    raise KvbenchError(f"unknown corpus {corpus_name!r}; known: {', '.join(CORPORA)}")


def token_ids_sha256(ids: list[int] | np.ndarray) -> str:
    """sha256 of the ids as little-endian int64 bytes (the manifest's ``token_ids_sha256``)."""
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()


def _tokenize(tokenizer, text: str) -> list[int]:
    enc = tokenizer(text)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    ids = list(ids)
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def build_token_ids(
    corpus_name: str, tokenizer, n_tokens: int, extra: int = 0
) -> tuple[list[int], dict[str, Any]]:
    """The first ``n_tokens + extra`` token ids of a corpus, and a description of the prefix.

    ``ids[:n_tokens]`` is the prompt; ``ids[n_tokens:]`` (``extra`` ids) is its continuation, for
    stages that score next-token quality. ``info`` describes the prompt only: ``{name, n_tokens,
    token_ids_sha256}`` (plus ``extra`` and ``continuation_sha256`` when ``extra > 0``). Raises
    KvbenchError when the corpus is shorter than ``n_tokens + extra`` tokens.
    """
    if n_tokens < 1 or extra < 0:
        raise KvbenchError(
            f"build_token_ids: need n_tokens >= 1 and extra >= 0, got {n_tokens}, {extra}"
        )
    want = n_tokens + extra
    if corpus_name == "repeated_paragraph":
        # Repeat until the tokenized text is long enough (spec §3.1), then truncate.
        chars = len(REPEATED_PARAGRAPH) * 8
        while True:
            ids = _tokenize(tokenizer, corpus_text(corpus_name, chars))
            if len(ids) > want:  # strictly longer: the cut never falls at the end of the text
                break
            chars *= 2
    else:
        ids = _tokenize(tokenizer, corpus_text(corpus_name))
    if len(ids) < want:
        raise KvbenchError(
            f"corpus {corpus_name!r} has only {len(ids)} tokens with this tokenizer, need "
            f"{n_tokens}{f' + {extra} continuation' if extra else ''}; use a shorter context or a "
            "longer corpus (corpus.name: file:<path>)"
        )
    ids = ids[:want]
    info: dict[str, Any] = {
        "name": corpus_name,
        "n_tokens": n_tokens,
        "token_ids_sha256": token_ids_sha256(ids[:n_tokens]),
    }
    if extra:
        info["extra"] = extra
        info["continuation_sha256"] = token_ids_sha256(ids[n_tokens:])
    return ids, info
