"""Query text: normalisation, the text encoder's context limit, and head/torso/tail bands."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

import numpy as np
import polars as pl
import pyarrow as pa

PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)
WHITESPACE = re.compile(r"\s+")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")  # and zero-width characters


def normalise_query(text: str, strip_punctuation: bool = False) -> str:
    """NFKC, case folding, control characters, zero-width characters and byte-order marks to spaces,
    optional punctuation stripping, whitespace collapse."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = CONTROL.sub(" ", text)
    if strip_punctuation:
        text = PUNCTUATION.sub(" ", text)
    return WHITESPACE.sub(" ", text).strip()


def normalise_queries(raw: pa.Array, strip_punctuation: bool = False) -> pa.Array:
    """normalise_query over an Arrow string array, equal to it element by element: pure-ASCII
    queries (after NFKC) in Arrow's vectorised kernels, where lower-casing is case folding and
    the patterns mean the same in RE2 as in Python; the rest through normalise_query. A long-tail
    log has millions of distinct queries, and a Python call each took most of extract's time."""
    import pyarrow.compute as pc

    text = pc.utf8_normalize(raw, "NFKC")
    ascii_rows = pc.fill_null(pc.string_is_ascii(text), True)
    fast = pc.replace_substring_regex(pc.ascii_lower(text), r"[\x00-\x1f\x7f]", " ")
    if strip_punctuation:
        fast = pc.replace_substring_regex(fast, r"[^\w\s]", " ")
    fast = pc.utf8_trim_whitespace(pc.replace_substring_regex(fast, r"\s+", " "))
    if pc.all(ascii_rows).as_py():
        return fast
    slow_at = pc.indices_nonzero(pc.invert(ascii_rows))
    slow = pa.array([normalise_query(q, strip_punctuation) for q in pc.take(raw, slow_at).to_pylist()], pa.string())
    return pc.replace_with_mask(fast, pc.invert(ascii_rows), slow)


def too_long_for_text_encoder(queries: pa.Array, count_tokens: Callable[[str], int], context: int) -> np.ndarray:
    """Whether each query needs more than the text encoder's `context` tokens; `count_tokens` gives
    a query's tokens with the start and end tokens (the configured model's tokenizer)."""
    import pyarrow.compute as pc

    too_long = np.zeros(len(queries), bool)
    # byte-level BPE never yields more tokens than UTF-8 bytes (+2), so only long queries are tokenised
    long_at = np.flatnonzero(pc.fill_null(pc.greater(pc.binary_length(queries), context - 2), False)
                             .to_numpy(zero_copy_only=False))
    for i, query in zip(long_at, pc.take(queries, pa.array(long_at, pa.int64())).to_pylist(), strict=True):
        too_long[i] = count_tokens(query) > context
    return too_long


def frequency_bands(pairs: pl.DataFrame) -> dict[str, str]:
    """head / torso / tail per query: by impressions, the queries covering the first 50%, next 30%,
    last 20% of traffic. `pairs` needs `query` and `impressions` columns."""
    per_query = pairs.group_by("query").agg(pl.col("impressions").sum().alias("n")).sort(
        ["n", "query"], descending=[True, False])
    before = per_query["n"].cum_sum() - per_query["n"]
    total = max(1, int(per_query["n"].sum()))
    bands = ["head" if b < 0.5 * total else "torso" if b < 0.8 * total else "tail" for b in before]
    return dict(zip(per_query["query"], bands, strict=True))
