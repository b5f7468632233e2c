"""Corpus token ids: deterministic, checksummed, prefix-stable, with a continuation."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from kvbench.corpus import (
    REPEATED_PARAGRAPH,
    build_token_ids,
    corpus_text,
    pydoc_topics_text,
    token_ids_sha256,
)
from kvbench.errors import KvbenchError
from kvbench.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_pydoc_topics_is_large_fixed_order_english():
    from pydoc_data.topics import topics

    text = pydoc_topics_text()
    assert len(text) > 400_000
    first = sorted(topics)[0]
    assert text.startswith(topics[first].strip("\n")[:200])
    assert text == pydoc_topics_text()


def test_token_ids_deterministic_and_sha(tok):
    ids, info = build_token_ids("pydoc_topics", tok, 300)
    ids2, info2 = build_token_ids("pydoc_topics", tok, 300)
    assert ids == ids2 and info == info2
    assert len(ids) == 300 and ids[0] == tok.bos_token_id  # default call adds BOS
    want = hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()
    assert info == {"name": "pydoc_topics", "n_tokens": 300, "token_ids_sha256": want}
    assert token_ids_sha256(ids) == want
    assert tok.decode(ids[1:40]) == pydoc_topics_text()[:39]  # byte-level: 1 token per char here


def test_continuation_extends_the_same_prefix(tok):
    ids, info = build_token_ids("pydoc_topics", tok, 300)
    more, info_more = build_token_ids("pydoc_topics", tok, 300, extra=50)
    assert len(more) == 350 and more[:300] == ids
    assert info_more["token_ids_sha256"] == info["token_ids_sha256"]
    assert info_more["extra"] == 50
    assert info_more["continuation_sha256"] == token_ids_sha256(more[300:])


def test_repeated_paragraph_protocol(tok):
    p = REPEATED_PARAGRAPH
    assert p.startswith(
        "You are a careful technical writer. Please produce a long, self-contained explanation of "
        "how transformer key/value caches work"
    )
    assert p.endswith("Include concrete numerical examples throughout.\n\n")
    assert 490 <= len(p) <= 530
    ids, info = build_token_ids("repeated_paragraph", tok, 2000)
    assert len(ids) == 2000 and info["name"] == "repeated_paragraph"
    text = tok.decode(ids[1:], skip_special_tokens=True)
    assert text.startswith(p + p + p) and p[:100] in text[-600:]
    assert corpus_text("repeated_paragraph", 1200) == p * 3


def test_file_corpus_and_errors(tok, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abc " * 100, encoding="utf-8")
    ids, info = build_token_ids(f"file:{f}", tok, 50)
    assert info["name"] == f"file:{f}" and len(ids) == 50
    with pytest.raises(KvbenchError, match="has only 401 tokens .* need 500"):
        build_token_ids(f"file:{f}", tok, 500)
    with pytest.raises(KvbenchError, match="400 \\+ 10 continuation"):
        build_token_ids(f"file:{f}", tok, 400, extra=10)
    with pytest.raises(KvbenchError, match="cannot read"):
        build_token_ids(f"file:{tmp_path / 'nope.txt'}", tok, 5)
    with pytest.raises(KvbenchError, match="unknown corpus"):
        build_token_ids("wikipedia", tok, 5)
