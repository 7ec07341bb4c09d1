"""The query path: what `clickclip search` and `clickclip serve` answer with.

The serving pointer (in the index database, or serving.json beside FAISS files) names the model
version and its index table, and the table's record holds the served configuration it was built
from (the one the gate decided on): how to normalise the query, whether to fuse BM25 hits over
titles, with which weight and depth. The config file says where the index is, never how to rank.
The version's ONNX text tower encodes the normalised query; `serving.index.answer` ranks it. A
process whose text tower is not the pointer's version refuses to answer.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pipeline import registry
from pipeline.config import RunConfig
from pipeline.errors import StageError
from pipeline.serving.index import IndexStore, VersionMismatch, answer, current_serving, replay
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
        return answer(self.store, self.cfg.promote.model_name, self.version, self.encoder, query, k)

    def close(self) -> None:
        self.store.close()
        self._workdir.cleanup()


def verify_serving(cfg: RunConfig) -> dict:
    """Publish's replay against what serves now: the publishing run's test queries through the query
    path (the serving version's ONNX text tower, the serving table, its recorded configuration),
    compared with that run's evaluate rankings. Fails loudly when they differ."""
    searcher = Searcher(cfg)
    try:
        current = current_serving(searcher.store, cfg.promote.model_name)
        reference = cfg.runs_dir / current.run_id / "evaluate" / "served_rankings.json"
        if not current.run_id or not reference.is_file():
            raise StageError(f"cannot verify index {current.table}: the rankings evaluate scored for it ({reference}) "
                             "are not here; run verify-serving where the pipeline's runs folder is")
        parity = replay(searcher.store, current, searcher.encoder, json.loads(reference.read_text()),
                        cfg.publish.check_queries)
    finally:
        searcher.close()
    ok = parity.identical == parity.queries and parity.overlap >= cfg.publish.min_recall
    return {"model_name": cfg.promote.model_name, "version": current.version, "table": current.table,
            "run_id": current.run_id, "served_config": current.served.to_dict(), "parity": parity.as_dict(),
            "passed": ok, "sentence": parity.sentence()}


def http_app(searcher: Searcher):
    """GET /search?q=...&k=20 -> JSON {query, normalised_query, version, table, served_config,
    results: [{image_id, score, title, product_id, path, version}]} (`answer`); 409 when the serving
    pointer moved to another version than the loaded text tower (restart to reload)."""
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
