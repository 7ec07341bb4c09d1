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
from datetime import UTC, datetime
from pathlib import Path

from pipeline import registry
from pipeline.config import RunConfig
from pipeline.errors import NothingServes, StageError
from pipeline.retrieval.interleaving import CHALLENGER, CHAMPION, request_rng, swap_pair, team_draft
from pipeline.serving.impressions import ImpressionLog, UnknownRequest, new_request_id
from pipeline.serving.index import IndexStore, VersionMismatch, answer, challenger_key, current_serving, replay
from pipeline.serving.stores import open_store
from pipeline.training.onnx_export import OnnxTextEncoder


class Searcher:
    """A pointer's version's text tower, loaded once, and a connection to the index database: the
    champion's pointer, or with `challenger` the challenger's (`serving.index.challenger_key`)."""

    def __init__(self, cfg: RunConfig, challenger: bool = False):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a query path prints answers only
        self.cfg = cfg
        self.key = challenger_key(cfg.promote.model_name) if challenger else cfg.promote.model_name
        self.store: IndexStore = open_store(cfg.publish, cfg.state_dir / cfg.name)
        current = self.store.serving(self.key)
        if current is None:
            self.store.close()
            if challenger:
                raise NoChallenger(f"model {cfg.promote.model_name!r} has no challenger")
            raise NothingServes(f"nothing serves for model {cfg.promote.model_name!r} yet: no promoted version has a "
                             "published index (run the pipeline; publish builds it when the gates pass)")
        self.version = current.version
        self._workdir = tempfile.TemporaryDirectory()
        checkpoint, onnx = registry.download_version(cfg.promote, current.version, Path(self._workdir.name))
        self.encoder = OnnxTextEncoder(onnx, checkpoint)

    def __call__(self, query: str, k: int = 20) -> dict:
        if not query.strip():
            raise StageError("an empty query has nothing to search for")
        return answer(self.store, self.key, self.version, self.encoder, query, k)

    def close(self) -> None:
        self.store.close()
        self._workdir.cleanup()


class NoChallenger(StageError):
    """The model has no challenger pointer: serve answers from the champion alone."""


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


class Server:
    """What `clickclip serve` runs: the champion, the challenger when there is one (interleaved with
    the champion by team draft for `serve.interleave.traffic` of the searches, each list fixed by
    the seed and the request id), and the impression log (`serve.log_impressions`)."""

    def __init__(self, cfg: RunConfig, champion: Searcher, challenger: Searcher | None, log: ImpressionLog | None):
        self.cfg, self.champion, self.challenger, self.log = cfg, champion, challenger, log
        self.counters = {"searches": 0, "interleaved": 0, "interleaving_skipped": 0}

    @classmethod
    def open(cls, cfg: RunConfig) -> Server:
        champion = Searcher(cfg)
        try:
            challenger = Searcher(cfg, challenger=True) if cfg.serve.interleave.traffic > 0 else None
        except NoChallenger:
            challenger = None
        scfg = cfg.serve
        log = ImpressionLog(scfg.log_folder(cfg.state_dir, cfg.name), scfg.flush_seconds, scfg.max_buffered_rows,
                            scfg.recent_requests).start() if scfg.log_impressions else None
        return cls(cfg, champion, challenger, log)

    def search(self, query: str, k: int, session_id: str | None = None) -> dict:
        request_id = new_request_id(datetime.now(UTC))
        icfg = self.cfg.serve.interleave
        result = None
        # two streams: the share's draw must not be the team draft's first coin
        if self.challenger is not None and request_rng(icfg.seed, f"share:{request_id}").random() < icfg.traffic:
            try:
                result = self._interleaved(query, k, request_rng(icfg.seed, request_id))
            except StageError:  # the challenger's pointer moved (promoted, retired): the champion answers
                self.counters["interleaving_skipped"] += 1
        if result is None:
            result = self.champion(query, k)
            for item in result["results"]:
                item["team"] = None
        self.counters["searches"] += 1
        self.counters["interleaved"] += result.get("interleaved", False)
        result = {"request_id": request_id, "interleaved": False, **result}
        items = [(r["image_id"], position, r["team"], None, position)
                 for position, r in enumerate(result["results"], start=1)]
        swap = swap_pair(len(items), self.cfg.serve.swap_rate, request_rng(icfg.seed, f"swap:{request_id}"))
        if swap is not None:
            pivot, chance = swap
            upper, lower = items[pivot], items[pivot + 1]
            items[pivot] = (lower[0], pivot + 1, lower[2], chance, pivot + 2)
            items[pivot + 1] = (upper[0], pivot + 2, upper[2], chance, pivot + 1)
            results = result["results"]
            results[pivot], results[pivot + 1] = results[pivot + 1], results[pivot]
            result["swapped"] = [pivot + 1, pivot + 2]
        if self.log is not None:
            self.log.shown(session_id or request_id, query, result["version"], items, request_id)
        return result

    def _interleaved(self, query: str, k: int, rng) -> dict:
        ours, theirs = self.champion(query, k), self.challenger(query, k)
        by_team = {CHAMPION: {r["image_id"]: r for r in ours["results"]},
                   CHALLENGER: {r["image_id"]: r for r in theirs["results"]}}
        shown = team_draft(list(by_team[CHAMPION]), list(by_team[CHALLENGER]), k, rng)
        return {**ours, "interleaved": True, "version": f"{ours['version']}|{theirs['version']}",
                "challenger_version": theirs["version"], "challenger_table": theirs["table"],
                "challenger_served_config": theirs["served_config"], "k": len(shown),
                "results": [{**by_team[team][image], "team": team} for image, team in shown]}

    def health(self) -> dict:
        return {"model_name": self.cfg.promote.model_name, "version": self.champion.version,
                "challenger_version": self.challenger.version if self.challenger else None,
                "interleave_traffic": self.cfg.serve.interleave.traffic if self.challenger else 0.0,
                **self.counters, "impression_log": self.log.metrics() if self.log else {"logging": "off"}}

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        for searcher in (self.champion, self.challenger):
            if searcher is not None:
                searcher.close()


def http_app(server: Server):
    """GET /search?q=...&k=20[&session=...] -> JSON {request_id, interleaved, query, normalised_query,
    version, table, served_config, results: [{image_id, score, title, product_id, path, version, team}]}
    (`answer`); 409 when the serving pointer moved to another version than the loaded text tower.
    POST /click {request_id, image_id, dwell_ms} logs a click on a result; 404 for a request this
    process did not answer. GET /health and /metrics: versions, counters, the impression log's state."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def search(request):
        query = request.query_params.get("q", "")
        try:
            k = int(request.query_params.get("k", "20"))
            return JSONResponse(server.search(query, max(1, min(k, 1000)), request.query_params.get("session")))
        except ValueError:
            return JSONResponse({"error": "k must be an integer"}, status_code=400)
        except VersionMismatch as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        except StageError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    async def click(request):
        try:
            body = await request.json()
            request_id, image_id = str(body["request_id"]), str(body["image_id"])
            dwell = body.get("dwell_ms")
            if dwell is not None and (isinstance(dwell, bool) or not isinstance(dwell, int)):
                raise TypeError("dwell_ms")
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "POST a JSON object {request_id, image_id, dwell_ms (optional, a whole "
                                          "number of milliseconds)}"}, status_code=400)
        if server.log is None:
            return JSONResponse({"error": "serve.log_impressions is off: clicks are not logged"}, status_code=404)
        try:
            server.log.clicked(request_id, image_id, dwell)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except UnknownRequest as exc:
            return JSONResponse({"error": f"unknown request: {exc.args[0]} (not answered by this process, or older "
                                          f"than its last serve.recent_requests responses)"}, status_code=404)
        return JSONResponse({"logged": True, "logging": server.log.metrics()["logging"]})

    async def health(request):
        return JSONResponse(server.health())

    async def metrics(request):
        lines = []
        for key, value in server.health().items():
            if isinstance(value, dict):
                lines += [f"clickclip_impression_log_{k} {float(v)}" for k, v in value.items()
                          if isinstance(v, int | float) and not isinstance(v, bool)]
                lines.append(f"clickclip_impression_log_stopped {float(value.get('logging') == 'stopped')}")
            elif isinstance(value, int | float) and not isinstance(value, bool):
                lines.append(f"clickclip_{key} {float(value)}")
        return PlainTextResponse("\n".join(lines) + "\n")

    return Starlette(routes=[Route("/search", search), Route("/click", click, methods=["POST"]),
                             Route("/health", health), Route("/metrics", metrics)])


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2)
