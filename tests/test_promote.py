import pytest

from pipeline.config import PromoteConfig
from pipeline.registry import flatten
from pipeline.registry import redact_uri as _redact
from pipeline.stages.promote import GateInputs, decide


def _evaluation(candidate, baseline_value, baseline="champion", low=None):
    delta = candidate - baseline_value
    return {"baseline": baseline,
            "models": {"candidate": {"recall@10": candidate}, baseline: {"recall@10": baseline_value}},
            "delta_vs_baseline": {"recall@10": {"mean": delta, "low": delta if low is None else low,
                                                "high": delta + 0.01}}}


FINE = GateInputs(quarantine_rate=0.01, leak_audit_passed=True, finished_without_nan=True)


def test_promotes_only_beyond_the_margin():
    cfg = PromoteConfig(margin=0.01)
    assert decide(_evaluation(0.30, 0.28), cfg, FINE)[0] is True
    assert decide(_evaluation(0.285, 0.28), cfg, FINE)[0] is False
    assert decide(_evaluation(0.28, 0.28), PromoteConfig(), FINE)[0] is False  # a tie does not promote


def test_lower_confidence_bound_gate():
    noisy = _evaluation(0.30, 0.28, low=-0.01)
    assert decide(noisy, PromoteConfig(), FINE)[0] is False
    assert decide(noisy, PromoteConfig(gates={"use_lower_bound": False}), FINE)[0] is True


@pytest.mark.parametrize("inputs, gate", [
    (GateInputs(0.5, True, True), "quarantine_rate"),
    (GateInputs(0.0, False, True), "leak_audit"),
    (GateInputs(0.0, True, False), "no_nan"),
])
def test_each_gate_can_block(inputs, gate):
    promoted, reason, gates = decide(_evaluation(0.5, 0.1), PromoteConfig(), inputs)
    assert not promoted and gate in reason
    assert [g["gate"] for g in gates if not g["passed"]] == [gate]


def test_minimum_candidate_gate():
    promoted, reason, _ = decide(_evaluation(0.05, 0.01), PromoteConfig(gates={"min_candidate": 0.1}), FINE)
    assert not promoted and "min_candidate" in reason


def test_reason_names_the_numbers():
    _, reason, _ = decide(_evaluation(0.3, 0.1, baseline="start"), PromoteConfig(), FINE)
    assert "+0.2000" in reason and "start" in reason


def test_unknown_metric_is_an_error():
    with pytest.raises(KeyError, match="recall@7"):
        decide(_evaluation(0.3, 0.1), PromoteConfig(metric="recall@7"), FINE)


def test_flatten_and_redact():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert _redact("https://user:secret@mlflow.example:5000") == "https://***@mlflow.example:5000"
    assert _redact("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"


@pytest.fixture
def registry(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = PromoteConfig(model_name="m", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=str(tmp_path))
    return cfg, client


def _aliases(client) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model("m").aliases.items()}


def test_champion_moves_and_previous_follows(registry):
    from pipeline.registry import move_champion as _move_champion

    cfg, client = registry
    _move_champion(client, "m", "1")
    assert _aliases(client) == {"champion": "1"}
    _move_champion(client, "m", "2")
    assert _aliases(client) == {"champion": "2", "previous": "1"}
    _move_champion(client, "m", "2")  # promoting the champion again changes nothing
    assert _aliases(client) == {"champion": "2", "previous": "1"}


def _run_config(promote: PromoteConfig, **sections):
    from pipeline.config import RunConfig

    return RunConfig.model_validate({"data": {"events": {"path": "e"}, "images": {"path": "i"}, "image_root": "r"},
                                     "promote": promote.model_dump(), **sections})


def test_rollback_and_forced_promotion_without_an_index(registry):
    from pipeline.errors import StageError
    from pipeline.registry import move_champion as _move_champion
    from pipeline.registry import promotion

    pcfg, client = registry
    cfg = _run_config(pcfg, publish={"enabled": False})
    _move_champion(client, "m", "1")
    _move_champion(client, "m", "2")
    summary = promotion.rollback(cfg, reason="bad recall in prod")
    assert summary["champion"] == "1" and summary["rolled_back"] == "2"
    assert _aliases(client) == {"champion": "1"}
    assert "bad recall in prod" in client.get_model_version("m", "2").tags["clickclip.rolled_back"]
    with pytest.raises(StageError, match="no 'previous'"):
        promotion.rollback(cfg)
    forced = promotion.force(cfg, "3", None, reason="hotfix for a broken tokenizer")
    assert forced["champion"] == "3"
    assert _aliases(client) == {"champion": "3", "previous": "1"}
    tags = client.get_model_version("m", "3").tags
    assert tags["clickclip.decision"] == "forced" and tags["clickclip.force_reason"].startswith("hotfix")
    with pytest.raises(StageError, match="reason"):
        promotion.force(cfg, "2", None, reason=" ")


def test_force_and_rollback_refuse_to_move_the_alias_without_an_index_to_serve(registry, tmp_path):
    """--force moved the alias and built no index (search kept serving the old version); rollback
    deleted `previous` before flipping the index, so a failed flip could not be rerun."""
    from pipeline.errors import StageError
    from pipeline.registry import move_champion as _move_champion
    from pipeline.registry import promotion

    pcfg, client = registry
    cfg = _run_config(pcfg, publish={"backend": "faiss"}, state_dir=str(tmp_path / "state"))
    _move_champion(client, "m", "1")
    _move_champion(client, "m", "2")
    with pytest.raises(StageError, match="no validated index"):
        promotion.force(cfg, "3", None, reason="hotfix")
    with pytest.raises(StageError, match="not rolling back to version 1: it has no index.*nothing was changed"):
        promotion.rollback(cfg, reason="bad")
    assert _aliases(client) == {"champion": "2", "previous": "1"}  # both refusals changed nothing
    assert "clickclip.rolled_back" not in client.get_model_version("m", "2").tags


def test_credentials_never_reach_the_manifest_or_mlflow_params(tiny_shop, tmp_path):
    from pipeline.registry import public_config
    from pipeline.runs import open_run
    from tests.conftest import shop_config

    cfg = shop_config(tiny_shop, tmp_path, promote={"tracking_uri": "https://ci-bot:s3cr3t@mlflow.internal:5000"})
    run = open_run(cfg, run_id="r")
    run.save()
    assert "s3cr3t" not in run.manifest_path.read_text()
    assert "s3cr3t" not in str(flatten(public_config(cfg)))
    assert flatten(public_config(cfg))["promote.tracking_uri"] == "https://***@mlflow.internal:5000"


def test_no_model_or_no_alias_means_no_champion(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.registry import champion_version

    cfg = PromoteConfig(model_name="m", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert champion_version(cfg) is None  # no such model
    MlflowClient(tracking_uri=cfg.tracking_uri).create_registered_model("m")
    assert champion_version(cfg) is None  # no such alias


def test_the_training_logger_leaves_the_process_tracking_uri_as_it_found_it(tmp_path, monkeypatch):
    import os

    from pipeline.registry import training_logger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = PromoteConfig(model_name="m", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    logger = training_logger(cfg, "run-1")
    logger.log_metrics({"loss": 1.0}, step=0)  # the logger still writes to its own store
    logger.finalize("success")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # a later subprocess must not inherit this run's store
    assert logger.experiment.get_run(logger.run_id).data.metrics["loss"] == 1.0


def test_a_registry_that_cannot_be_read_stops_instead_of_meaning_no_champion(tmp_path, monkeypatch):
    from pipeline.registry import RegistryError, champion_version
    from tests.conftest import free_port

    garbage = tmp_path / "mlflow.db"
    garbage.write_text("not a database " * 100)
    with pytest.raises(RegistryError, match=rf"store at sqlite:///{garbage}.*looking up the champion"):
        champion_version(PromoteConfig(model_name="m", tracking_uri=f"sqlite:///{garbage}"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = f"http://ci-bot:s3cr3t@127.0.0.1:{free_port()}"
    with pytest.raises(RegistryError) as refused:
        champion_version(PromoteConfig(model_name="m", tracking_uri=down))
    assert "http://***@127.0.0.1" in str(refused.value) and "s3cr3t" not in str(refused.value)


def test_the_champion_moves_only_from_the_version_that_was_evaluated(registry):
    from pipeline.registry import ChampionMoved, move_champion, promote_version

    cfg, client = registry
    move_champion(client, "m", "1")
    with pytest.raises(ChampionMoved, match="evaluated against champion 2.*champion is now 1"):
        promote_version(cfg, "3", expected_champion="2")
    with pytest.raises(ChampionMoved, match=r"evaluated against champion \(none\)"):
        promote_version(cfg, "3", expected_champion=None)
    assert _aliases(client) == {"champion": "1"}
    promote_version(cfg, "3", expected_champion="1")
    assert _aliases(client) == {"champion": "3", "previous": "1"}


def test_a_run_is_compared_with_the_champion_before_its_own_promotion(registry):
    from pipeline.registry import baseline_champion, move_champion

    cfg, client = registry
    assert baseline_champion(cfg, "run-b") is None
    move_champion(client, "m", "1")
    client.set_model_version_tag("m", "2", "clickclip.run_id", "run-b")
    client.set_model_version_tag("m", "2", "clickclip.parent_champion_version", "1")
    assert baseline_champion(cfg, "run-b") == "1"
    move_champion(client, "m", "2")  # run-b was promoted: its baseline stays the version before it
    assert baseline_champion(cfg, "run-b") == "1"
    assert baseline_champion(cfg, "run-c") == "2"


def test_the_evaluated_champion_is_part_of_evaluates_fingerprint(tiny_shop, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.registry import move_champion
    from pipeline.runs import open_run
    from tests.conftest import shop_config

    cfg = shop_config(tiny_shop, tmp_path)
    client = MlflowClient(tracking_uri=cfg.promote.tracking_uri)
    client.create_registered_model(cfg.promote.model_name)
    for _ in range(2):
        client.create_model_version(cfg.promote.model_name, source=str(tmp_path))
    before = {stage: open_run(cfg, run_id="r").fingerprint(stage) for stage in ("train", "evaluate", "promote")}
    move_champion(client, cfg.promote.model_name, "1")
    after = {stage: open_run(cfg, run_id="r").fingerprint(stage) for stage in ("train", "evaluate", "promote")}
    assert before["train"] == after["train"]
    assert before["evaluate"] != after["evaluate"] and before["promote"] != after["promote"]


def test_no_credentials_reach_the_terminal(tiny_shop, tmp_path, monkeypatch, capsys):
    import sys

    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.runner import redacted_output
    from tests.conftest import free_port, shop_config

    # what MLflow prints itself when a run ends on an HTTP store ("View run ... at: <uri>")
    with redacted_output():
        sys.stdout.write("🏃 View run r at: https://ci-bot:s3cr3t@mlflow.internal/#/experiments/1/runs/9\n")
    assert capsys.readouterr().out == "🏃 View run r at: https://***@mlflow.internal/#/experiments/1/runs/9\n"
    # and a command whose store refuses the connection
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = shop_config(tiny_shop, tmp_path, promote={"tracking_uri": f"http://ci-bot:s3cr3t@127.0.0.1:{free_port()}"})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["rollback", "--config", str(config), "--reason", "x"])
    assert result.exit_code == 2 and "***@127.0.0.1" in result.output
    assert "s3cr3t" not in result.output


def test_the_decision_line_prints_the_relation_that_holds():
    from pipeline.runner import champion_line

    _, reason, gates = decide(_evaluation(0.30, 0.31), PromoteConfig(), FINE)
    beats = next(g for g in gates if g["gate"] == "beats_baseline")
    assert not beats["passed"] and "-0.0100 ≤ margin 0.0" in beats["detail"] and "≤ margin" in reason
    _, _, passed = decide(_evaluation(0.35, 0.30), PromoteConfig(), FINE)
    assert "+0.0500 > margin 0.0" in next(g for g in passed if g["gate"] == "beats_baseline")["detail"]
    refused = {"model_name": "m", "version": "4", "promoted": False, "champion_uri": "models:/m@champion",
               "champion_version": None}
    assert champion_line(refused).startswith("champion: none yet") and "models:/" not in champion_line(refused)
    assert champion_line(refused | {"champion_version": "2"}) == "champion: models:/m@champion = version 2"


@pytest.mark.parametrize("model", ["candidate", "hybrid(candidate)", "candidate+title", "hybrid_rrf(champion)"])
def test_every_configuration_logs_under_a_name_mlflow_accepts(model):
    """Regression: `eval.candidate+title.recall_at_1` made MLflow refuse the whole log batch."""
    from mlflow.utils.validation import _validate_metric_name

    from pipeline.stages.promote import metric_key

    key = metric_key(model, "snips_recall@10")
    _validate_metric_name(key)
    assert key.endswith(".snips_recall_at_10")


def test_serve_as_hybrid_gates_on_the_hybrid_configurations():
    evaluation = _evaluation(0.10, 0.10) | {"served": {"as": "hybrid", "candidate": "hybrid(candidate)",
                                                       "baseline": "hybrid(champion)"}}
    evaluation["models"] |= {"hybrid(candidate)": {"recall@10": 0.40}, "hybrid(champion)": {"recall@10": 0.30}}
    # evaluate computes delta_vs_baseline for the served pair; the floor gate reads the served candidate
    evaluation["delta_vs_baseline"] = {"recall@10": {"mean": 0.10, "low": 0.05, "high": 0.15}}
    promoted, _, gates = decide(evaluation, PromoteConfig(serve_as="hybrid", gates={"min_candidate": 0.35}), FINE)
    assert promoted
    floor = next(g for g in gates if g["gate"] == "min_candidate")
    assert floor["detail"].startswith("hybrid(candidate) recall@10 0.4000")
    assert "hybrid(candidate) − hybrid(champion)" in next(g for g in gates if g["gate"] == "beats_baseline")["detail"]


def test_a_regression_on_earlier_runs_held_out_queries_blocks_promotion():
    evaluation = _evaluation(0.35, 0.30) | {"earlier_heldout": {"queries": 40, "delta": -0.05, "low": -0.09,
                                                                "high": -0.01}}
    promoted, reason, _ = decide(evaluation, PromoteConfig(), FINE)
    assert not promoted and "earlier_heldout" in reason and "-0.0500 < −0.02" in reason
    evaluation["earlier_heldout"]["delta"] = -0.01
    assert decide(evaluation, PromoteConfig(), FINE)[0]
    assert decide(evaluation | {"earlier_heldout": {"queries": 0}}, PromoteConfig(), FINE)[0]


def test_rollback_sets_champion_when_only_previous_is_left(registry):
    """With `previous` set and no `champion` alias, rollback deleted `previous` and set no champion."""
    from pipeline.registry import promotion

    pcfg, client = registry
    client.set_registered_model_alias("m", "previous", "1")
    summary = promotion.rollback(_run_config(pcfg, publish={"enabled": False}), reason="x")
    assert summary["champion"] == "1" and _aliases(client) == {"champion": "1"}


def test_the_interleave_readout_without_a_challenger_changes_nothing_even_before_any_model(tmp_path, tiny_config):
    from pipeline.online import interleave_readout

    cfg = tiny_config.model_copy(update={"promote": PromoteConfig(
        model_name="m", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")})
    summary = interleave_readout(cfg, decide=True)
    assert summary["challenger"] is None and summary["decision"] == "none" and "no challenger" in summary["sentence"]
