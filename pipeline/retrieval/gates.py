"""The promotion gates: pure functions of evaluate's summary, the promote config and a few facts
from earlier stages. Evaluate shows them in the report; promote applies them."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import PromoteConfig


@dataclass(frozen=True)
class GateInputs:
    """What the gates need from the earlier stages, besides the evaluation."""

    quarantine_rate: float
    leak_audit_passed: bool
    finished_without_nan: bool

    @classmethod
    def from_summaries(cls, extract: dict, leak_audit: dict, train: dict) -> GateInputs:
        """From extract's and train's summaries and the leak audit's result (leak_audit.json)."""
        # rows outside the window are not bad data: the rate is over the rows in it
        in_window = extract.get("rows_in_window", extract["rows_read"])
        return cls(quarantine_rate=extract["rows_quarantined"] / max(1, in_window),
                   leak_audit_passed=bool(leak_audit["passed"]),
                   finished_without_nan=train["finished_without_nan"])


def _of(earlier: dict) -> str:
    return f" of {earlier['of_queries']}" if "of_queries" in earlier else ""


def evaluate_gates(evaluation: dict, cfg: PromoteConfig, inputs: GateInputs) -> list[dict]:
    """Each gate with pass/fail and the numbers behind it."""
    models = evaluation["models"]
    # the configurations production serves (promote.serve_as): dense models, or hybrid search
    served = evaluation.get("served", {"candidate": "candidate", "baseline": evaluation["baseline"]})
    name, baseline = served["candidate"], served["baseline"]
    if cfg.metric not in models[name]:
        raise KeyError(f"promote.metric {cfg.metric!r} is not one of {sorted(models[name])}")
    candidate = models[name][cfg.metric]
    delta = evaluation["delta_vs_baseline"][cfg.metric]
    statistic = delta["low"] if cfg.gates.use_lower_bound else delta["mean"]
    label = "95% CI lower bound" if cfg.gates.use_lower_bound else "mean"
    floor, beats = candidate >= cfg.gates.min_candidate, statistic > cfg.margin
    rate_ok = inputs.quarantine_rate <= cfg.gates.max_quarantine_rate
    earlier = evaluation.get("earlier_heldout") or {"queries": 0}
    tolerance = cfg.gates.max_earlier_heldout_regression
    earlier_ok = not earlier["queries"] or earlier["delta"] >= -tolerance
    # each detail prints the relation that holds, so a failed gate never reads like a passed one
    return [
        {"gate": "min_candidate", "passed": floor,
         "detail": f"{name} {cfg.metric} {candidate:.4f} {'≥' if floor else '<'} {cfg.gates.min_candidate}"},
        {"gate": "beats_baseline", "passed": beats,
         "detail": f"{label} of {name} − {baseline} {cfg.metric} {statistic:+.4f} {'>' if beats else '≤'} margin "
                   f"{cfg.margin} (mean {delta['mean']:+.4f}, CI [{delta['low']:+.4f}, {delta['high']:+.4f}])"},
        {"gate": "no_slice_regression", "passed": not evaluation.get("flagged_slices"),
         "detail": "flagged slices: " + (", ".join(evaluation.get("flagged_slices") or []) or "none")},
        {"gate": "earlier_heldout", "passed": earlier_ok,
         "detail": (f"{name} − {baseline} {cfg.metric} on {earlier['queries']}{_of(earlier)} queries held out by "
                    f"earlier runs {earlier['delta']:+.4f} {'≥' if earlier_ok else '<'} −{tolerance}")
                   if earlier["queries"] else "no champion: nothing to compare" if "of_queries" not in earlier else
                   f"0{_of(earlier)} held-out queries have all their clicked images registered by earlier runs "
                   "(the first week, or a reset split registry): nothing to compare"},
        {"gate": "leak_audit", "passed": inputs.leak_audit_passed,
         "detail": "no group straddles splits" if inputs.leak_audit_passed else "groups straddle splits"},
        {"gate": "quarantine_rate", "passed": rate_ok,
         "detail": f"{inputs.quarantine_rate:.4f} of the window's event rows quarantined {'≤' if rate_ok else '>'} "
                   f"{cfg.gates.max_quarantine_rate}"},
        {"gate": "no_nan", "passed": inputs.finished_without_nan,
         "detail": "training finished without NaN" if inputs.finished_without_nan else "training stopped on a NaN"},
    ]


def decide(evaluation: dict, cfg: PromoteConfig, inputs: GateInputs) -> tuple[bool, str, list[dict]]:
    """Promote only when every gate passes; the reason lists the failed gates, or the decisive one."""
    gates = evaluate_gates(evaluation, cfg, inputs)
    failed = [g for g in gates if not g["passed"]]
    if failed:
        return False, "failed: " + "; ".join(f"{g['gate']} ({g['detail']})" for g in failed), gates
    return True, "all gates passed; " + gates[1]["detail"], gates
