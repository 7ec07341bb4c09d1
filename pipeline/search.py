"""The query path: what `clickclip search` and `clickclip serve` answer with.

The serving pointer (in the index database, or serving.json beside FAISS files) names the model
version and its index table; the version's ONNX text tower encodes the query, HNSW returns the
nearest catalog vectors, and with `promote.serve_as: hybrid` keyword hits over titles
(`publish.keyword`: BM25, or PostgreSQL full-text) are fused in with the weight the index was built
with. A process whose text tower is not the pointer's version refuses to answer.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pipeline import registry
from pipeline.config import RunConfig
from pipeline.errors import StageError
from pipeline.serving.index import IndexStore, VersionMismatch, answer
from pipeline.serving.stores import open_store
from pipeline.training.onnx_export import OnnxTextEncoder


class Searcher:
    """The pointer's version's text tower, loaded once, and a connection to the index database."""

    def __init__(self, cfg: RunConfig):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a query path prints answers only
        self.cfg = cfg
        self.store: IndexStore = open_store(cfg.publish, cfg.state_dir / cfg.name)
        current = self.store.serving(cfg.promote.model_name)
        if current is None:
            self.store.close()
            raise StageError(f"nothing serves for model {cfg.promote.model_name!r} yet: no promoted version has a "
                             "published index (run the pipeline; publish builds it when the gates pass)")
        self.version = current.version
        self._workdir = tempfile.TemporaryDirectory()
        checkpoint, onnx = registry.download_version(cfg.promote, current.version, Path(self._workdir.name))
        self.encoder = OnnxTextEncoder(onnx, checkpoint)

    def __call__(self, query: str, k: int = 20) -> dict:
        if not query.strip():
            raise StageError("an empty query has nothing to search for")
        return answer(self.store, self.cfg.promote.model_name, self.version, self.encoder([query])[0], query, k,
                      self.cfg.publish.ef_search, self.cfg.promote.serve_as == "hybrid", self.cfg.publish.keyword)

    def close(self) -> None:
        self.store.close()
        self._workdir.cleanup()


def follow_champion(cfg: RunConfig, version: str) -> str:
    """After a rollback: point search at `version`'s index (its `clickclip.index_table` tag), or say
    why it cannot (no index was published for it, or its table was dropped)."""
    table = registry.version_tags(cfg.promote, version).get("clickclip.index_table")
    store = open_store(cfg.publish, cfg.state_dir / cfg.name)
    try:
        current = store.serving(cfg.promote.model_name)
        if table is None or not store.exists(table):
            serving = f"version {current.version}" if current else "nothing"
            return (f"search still serves {serving}: version {version} has no index table "
                    f"({'none was published' if table is None else table + ' was dropped'}); rerun publish for it")
        store.flip(cfg.promote.model_name, version, table)
    finally:
        store.close()
    return f"search serves version {version} again (index {table})"


def http_app(searcher: Searcher):
    """GET /search?q=...&k=20 -> JSON {query, version, results: [{image_id, score}]}; 409 when the
    serving pointer moved to another version than the loaded text tower (restart to reload)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def search(request):
        query = request.query_params.get("q", "")
        try:
            k = int(request.query_params.get("k", "20"))
            return JSONResponse(searcher(query, max(1, min(k, 1000))))
        except ValueError:
            return JSONResponse({"error": "k must be an integer"}, status_code=400)
        except VersionMismatch as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        except StageError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    async def health(request):
        return JSONResponse({"version": searcher.version, "model_name": searcher.cfg.promote.model_name})

    return Starlette(routes=[Route("/search", search), Route("/health", health)])


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2)
