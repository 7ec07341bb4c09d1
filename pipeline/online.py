"""Online validation: the interleaving readout of serve's impression log, and its gate.

`readout` counts the interleaved searches of the current champion and challenger (the registry's
aliases) in the log: wins, losses and ties by the team-draft credit, the preference with its exact
interval and sign test (pipeline.retrieval.interleaving). With `decide`, the gate moves the
challenger to champion when the interval's lower bound is above zero after
`serve.interleave.min_queries` searches with a click, retires it when the upper bound is below zero,
and otherwise changes nothing; every readout is recorded on the challenger version's tags and in
`<state_dir>/<name>/interleaving/`. Without a challenger it says so and changes nothing.
"""

from __future__ import annotations

import json
import time

from pipeline import registry
from pipeline.config import RunConfig
from pipeline.registry import promotion
from pipeline.retrieval.interleaving import outcome, readout
from pipeline.serving.impressions import interleaved_searches


def interleave_readout(cfg: RunConfig, decide: bool = False) -> dict:
    pcfg, icfg = cfg.promote, cfg.serve.interleave
    aliases = registry.aliases(pcfg)
    champion, challenger = aliases.get("champion"), aliases.get("challenger")
    if challenger is None:
        return {"model_name": pcfg.model_name, "champion": champion, "challenger": None, "decision": "none",
                "sentence": "no challenger: nothing is interleaved (promote.policy interleave_first makes a gated "
                            "version the challenger)"}
    folder = cfg.serve.log_folder(cfg.state_dir, cfg.name)
    searches = interleaved_searches(folder, str(champion), str(challenger))
    result = readout([outcome(teams) for teams in searches], icfg.confidence, icfg.min_queries)
    summary = {"model_name": pcfg.model_name, "champion": champion, "challenger": challenger,
               "log": str(folder), **result.as_dict()}
    registry.set_version_tags(pcfg, str(challenger), {"clickclip.interleaving.readout": result.sentence()})
    if decide:
        summary["gate"] = promotion.end_challenger(cfg, result.decision, result.sentence(), champion)
    out = cfg.state_dir / cfg.name / "interleaving"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"readout-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
