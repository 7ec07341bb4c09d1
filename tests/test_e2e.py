"""The whole pipeline on a tiny demo shop, through the CLI, twice."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import StageError
from pipeline.retrieval.served import ServedConfig
from pipeline.training.model import embed_texts, load_checkpoint
from tests.conftest import free_port, shop_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def first_and_second_run(tiny_shop, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    cfg = shop_config(tiny_shop, work)
    config_file = work / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    runner = CliRunner()
    first = runner.invoke(app, ["run", "--config", str(config_file)])
    second = runner.invoke(app, ["run", "--config", str(config_file)])
    return cfg, work, first, second


def _run_dir(work):
    (run_dir,) = (work / "runs").iterdir()
    return run_dir


def test_run_ends_with_summary_and_champion(first_and_second_run):
    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    assert "champion: models:/clickclip-tiny@champion" in first.output
    assert "PROMOTED" in first.output
    client = MlflowClient(tracking_uri=cfg.promote.tracking_uri)
    champion = client.get_model_version_by_alias("clickclip-tiny", "champion")
    assert champion.tags["clickclip.decision"] == "promoted"
    # lineage names the code that trained it
    from pipeline.runs import code_digest, git_commit

    assert champion.tags["clickclip.source_sha256"] == code_digest()
    assert champion.tags["clickclip.git_commit"] == git_commit()


def test_trained_model_beats_untrained_on_test_split(first_and_second_run):
    _, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    metrics = json.loads((_run_dir(work) / "evaluate" / "metrics.json").read_text())["models"]
    assert metrics["candidate"]["recall@10"] > metrics["start"]["recall@10"]
    report = work / "reports" / _run_dir(work).name / "recall.md"
    assert "recall@10" in report.read_text()
    assert "| bot | 200 |" in report.read_text()
    assert (report.parent / "propensity.png").stat().st_size > 1000
    assert json.loads((report.parent / "metrics.json").read_text())["models"] == metrics


def test_the_same_seed_on_the_same_machine_gives_the_same_figures_bit_for_bit(first_and_second_run, tmp_path):
    """A second deployment (its own runs, registry and state), in another process (so another
    string-hash seed), trains and scores the same shop with the same config and seed: the same
    weights byte for byte and the same figures, unrounded."""
    from pipeline.training.model import weights_digest

    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    again = shop_config(Path(cfg.data.image_root).parent, tmp_path)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(again.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHASHSEED", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([str(Path(sys.executable).with_name("clickclip")), "run", "--config", str(config_file)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [_run_dir(work), _run_dir(tmp_path)]
    assert weights_digest(runs[0] / "train" / "model") == weights_digest(runs[1] / "train" / "model")
    trained = [json.loads((r / "train" / "metrics.json").read_text()) for r in runs]
    assert trained[0]["history"] == trained[1]["history"] and trained[0]["history"]
    assert trained[0]["best_val_recall@10"] == trained[1]["best_val_recall@10"]
    scored = [json.loads((r / "evaluate" / "metrics.json").read_text()) for r in runs]
    for key in ("models", "delta_vs_baseline", "vs_keyword", "tuning"):
        assert scored[0][key] == scored[1][key], key


def test_hybrid_and_title_configurations_are_tuned_on_validation_and_reported(first_and_second_run):
    _, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    summary = json.loads((_run_dir(work) / "evaluate" / "metrics.json").read_text())
    models = summary["models"]
    for name in ("hybrid(candidate)", "hybrid_rrf(candidate)", "candidate+title", "hybrid(start)"):
        assert {"recall@10", "ndcg@10", "snips_recall@10", "snips_ndcg@10"} <= set(models[name]), name
    tuning = summary["tuning"]["candidate"]
    assert tuning["tuned_on_queries"] > 0
    # weight 0 is keyword search's own order, so the tuned fusion is never below BM25 on validation
    assert max(score for _, score in tuning["hybrid_curve"]) >= tuning["keyword_on_val"]
    assert tuning["hybrid_weight"] in [w for w, _ in tuning["hybrid_curve"]]
    # dense mode gates what publish builds: the image + title vectors with the tuned β (the gate compared
    # the image-only vectors while publish wrote the +title ones)
    assert summary["served"] == {"as": "dense", "candidate": "candidate+title", "baseline": "start+title"}
    gated = summary["served_config"]["candidate"]
    assert gated["mode"] == "dense" and gated["title_weight"] == tuning["title_weight"]
    index = json.loads((_run_dir(work) / "publish" / "index.json").read_text())
    assert index["served_config"] == gated and index["title_weight"] == tuning["title_weight"]
    assert summary["served_config"]["baseline"]["tuned"] == "validation"  # the start may be tuned, and says so
    assert summary["debiased"]["effective_sample_size"] > 0
    assert any(row["family"] == "query kind" for row in summary["slices"])


def test_nothing_is_lost_and_nothing_leaks(first_and_second_run):
    _, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    run_dir = _run_dir(work)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    extract = manifest["stages"]["extract"]["summary"]
    quarantine = pl.read_parquet(run_dir / "extract" / "quarantine.parquet")
    pairs = pl.read_parquet(run_dir / "extract" / "pairs.parquet")
    assert pairs["impressions"].sum() + quarantine.height == extract["rows_read"]
    events = pl.read_parquet(manifest["config"]["data"]["events"]["path"])
    assert extract["rows_read"] == events.height
    images = pl.read_parquet(run_dir / "split" / "images.parquet")
    assert images.group_by("group_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert json.loads((run_dir / "split" / "leak_audit.json").read_text())["passed"]


def test_second_run_reuses_everything_and_registers_nothing_new(first_and_second_run):
    cfg, work, first, second = first_and_second_run
    assert second.exit_code == 0, second.output
    for stage in ("extract", "split", "train", "evaluate", "publish", "promote"):
        assert f"✓ {stage} reused" in second.output
    client = MlflowClient(tracking_uri=cfg.promote.tracking_uri)
    assert len(client.search_model_versions("name='clickclip-tiny'")) == 1


def test_champion_serves_the_evaluated_embeddings_in_a_fresh_process(first_and_second_run):
    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    code = (
        "import json, sys, mlflow, pandas as pd; "
        f"mlflow.set_tracking_uri({cfg.promote.tracking_uri!r}); "
        "m = mlflow.pyfunc.load_model('models:/clickclip-tiny@champion'); "
        "print(json.dumps(m.predict(pd.DataFrame({'text': ['navy trainers', 'red mug']})).tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    served = json.loads(out.stdout.strip().splitlines()[-1])
    local = embed_texts(load_checkpoint(_run_dir(work) / "train" / "model"), ["navy trainers", "red mug"])
    np.testing.assert_allclose(local, np.array(served), atol=1e-5)


BROWSER_PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.setAttribute('data-images', images.length);
  document.body.setAttribute('data-broken', images.filter(i => !(i.complete && i.naturalWidth > 0)).length);
});
</script></body>"""


def test_html_report_renders_in_headless_chromium_without_broken_images(first_and_second_run, tmp_path):
    import os
    import re
    import shutil

    _, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    (report,) = (work / "reports").glob("*/report.html")
    page = report.read_text()
    assert not re.search(r'src="(?!data:)', page)  # self-contained: no file or network references
    assert page.count('class="query"') >= 1 and "Re-index notice" in page and "bm25" in page
    # the report holds the decision, the keyword column per slice, training and the groups
    for section in ("<h2>Promotion decision</h2>", "beats_baseline", "keyword (bm25)", "<h2>Training</h2>",
                    'alt="training curves"', "<h3>Groups</h3>", 'alt="group size histogram"', "held-out click weight",
                    "Leak audit: passed", "<h2>Served configurations</h2>", 'alt="tuning curves"',
                    "hybrid(candidate)", "snips_recall@10"):
        assert section in page, section
    markdown = (report.parent / "recall.md").read_text()
    assert "## Promotion decision" in markdown and "## Training" in markdown and "keyword (bm25)" in markdown
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: `make test` installs it")
        pytest.skip("chromium not installed (make test installs it as root)")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", BROWSER_PROBE))
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    images = int(re.search(r'data-images="(\d+)"', done.stdout).group(1))
    broken = int(re.search(r'data-broken="(\d+)"', done.stdout).group(1))
    assert images >= 5 and broken == 0


def _venv_path() -> str:
    """PATH with this interpreter's bin first: mlflow starts uvicorn from there."""
    import os
    from pathlib import Path

    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {process.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def _stop(process: subprocess.Popen) -> None:
    import os
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_champion_carries_onnx_towers(first_and_second_run, tmp_path):
    import mlflow

    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    mlflow.set_tracking_uri(cfg.promote.tracking_uri)
    local = mlflow.artifacts.download_artifacts("models:/clickclip-tiny@champion", dst_path=str(tmp_path))
    (description,) = tmp_path.rglob("onnx.json")
    onnx = json.loads(description.read_text())
    assert onnx["text"]["file"] == "text.onnx" and max(onnx["parity_max_abs_diff"].values()) < 1e-4
    assert {p.name for p in description.parent.glob("*.onnx")} == {"text.onnx", "image.onnx"}, local
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pt"))  # no pickles


def test_mlflow_models_serve_embeds_a_query_over_http(first_and_second_run):
    import os
    import urllib.request
    from pathlib import Path

    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", "models:/clickclip-tiny@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": cfg.promote.tracking_uri, "PATH": _venv_path()}, cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", server)
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [["navy trainers"]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.array(json.loads(response.read())["predictions"])
    finally:
        _stop(server)
    local = embed_texts(load_checkpoint(_run_dir(work) / "train" / "model"), ["navy trainers"])
    np.testing.assert_allclose(served, local, atol=1e-5)


def _promote_again(cfg, work, run_id=None, champion=None, index=None, report_dir=None):
    """promote() of the first run's model under another clickclip run id, as if evaluated against `champion`."""
    from pipeline.stages.promote import GateInputs, promote

    run_dir = _run_dir(work)
    evaluation = json.loads((run_dir / "evaluate" / "metrics.json").read_text()) | {"champion_version": champion}
    lineage = {"git_commit": "test", "input_events_sha256": "x", "input_images_sha256": "y",
               "split_registry_version": "1", "parent_champion_version": str(champion or "none")}
    if index is None:  # the registry's part alone: no index to flip
        cfg = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"enabled": False})})
    return lambda mlflow_run_id, out: promote(
        cfg, run_id or run_dir.name, mlflow_run_id, evaluation, GateInputs(0.0, True, True), lineage,
        run_dir / "train" / "model", [], out, index, report_dir)


def test_promotion_interrupted_before_the_alias_move_is_finished_by_the_rerun(first_and_second_run, tmp_path,
                                                                               monkeypatch):
    import mlflow

    import pipeline.registry as registry_module

    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    store = cfg.promote.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                           "gates": cfg.promote.gates.model_copy(update={"min_candidate": 0.0})})
    fresh = cfg.model_copy(update={"promote": store})
    client = MlflowClient(tracking_uri=store.tracking_uri)
    experiment = client.create_experiment("crash")
    (tmp_path / "a").mkdir()
    first_version = _promote_again(fresh, work, "week-1")(client.create_run(experiment).info.run_id, tmp_path / "a")
    assert first_version.summary["promoted"]

    promote_run = _promote_again(fresh, work, "week-2", champion="1")
    crashing_run = client.create_run(experiment).info.run_id

    def crash(*args, **kwargs):
        raise SystemExit("killed between register and alias move")

    monkeypatch.setattr(registry_module, "move_champion", crash)
    (tmp_path / "b").mkdir()
    with pytest.raises(SystemExit):
        promote_run(crashing_run, tmp_path / "b")
    monkeypatch.undo()
    # consistent meanwhile: the champion is still the first version, complete and loadable
    assert [str(v.version) for v in client.search_model_versions("name='clickclip-tiny'")] == ["2", "1"]
    assert str(client.get_registered_model("clickclip-tiny").aliases["champion"]) == "1"
    mlflow.set_tracking_uri(store.tracking_uri)
    assert mlflow.pyfunc.load_model("models:/clickclip-tiny@champion") is not None

    rerun = promote_run(crashing_run, tmp_path / "b")
    assert rerun.summary["version"] == "2" and "interrupted alias move was completed" in rerun.summary["reason"]
    assert len(client.search_model_versions("name='clickclip-tiny'")) == 2
    assert {a: str(v) for a, v in client.get_registered_model("clickclip-tiny").aliases.items()} == {
        "champion": "2", "previous": "1"}
    # what the next weekly run's evaluate does with the champion: download and load it
    from pipeline.stages.evaluate import champion_model

    champion = champion_model(fresh, tmp_path / "download")
    assert champion.version == "2" and champion.bundle.model is not None
    # with the served configuration the gate decided on, recorded with the version
    assert champion.served.ranking_digest == ServedConfig.from_dict(
        json.loads((_run_dir(work) / "evaluate" / "metrics.json").read_text())["served_config"]["candidate"]
    ).ranking_digest


def test_promote_refuses_a_moved_champion_and_never_promotes_a_rolled_back_version(first_and_second_run, tmp_path):
    from pipeline.registry import ChampionMoved
    from pipeline.registry.promotion import rollback

    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    store = cfg.promote.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    fresh = cfg.model_copy(update={"promote": store})
    client = MlflowClient(tracking_uri=store.tracking_uri)
    for name in "abcd":
        (tmp_path / name).mkdir()
    assert _promote_again(fresh, work, "week-1")(None, tmp_path / "a").summary["promoted"]
    # week-2 was evaluated before week-1 became champion: nothing is registered, nothing moves
    with pytest.raises(ChampionMoved, match=r"compared it against champion \(none\).*now 1"):
        _promote_again(fresh, work, "week-2", champion=None)(None, tmp_path / "b")
    assert len(client.search_model_versions("name='clickclip-tiny'")) == 1
    week2 = _promote_again(fresh, work, "week-2", champion="1")
    assert week2(None, tmp_path / "c").summary["version"] == "2"
    # an MLflow run id the store does not know still finds week-2's version by its run-id tag
    again = week2("0" * 32, tmp_path / "d")
    assert again.summary["version"] == "2" and "nothing new" in again.summary["reason"]
    rollback(fresh.model_copy(update={"publish": fresh.publish.model_copy(update={"enabled": False})}),
             reason="bad in production")
    after = week2(None, tmp_path / "d")
    assert not after.summary["promoted"] and "rolled back" in after.summary["reason"]
    assert str(client.get_registered_model("clickclip-tiny").aliases["champion"]) == "1"
    assert len(client.search_model_versions("name='clickclip-tiny'")) == 2


def test_a_changed_gate_re_decides_and_a_changed_model_name_logs_to_a_fresh_mlflow_run(first_and_second_run,
                                                                                       tmp_path):
    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    strict = cfg.promote.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "margin": 0.99})
    client = MlflowClient(tracking_uri=strict.tracking_uri)
    experiment = client.create_experiment("gates")
    training_run = client.create_run(experiment).info.run_id
    (tmp_path / "out").mkdir()
    out = tmp_path / "out"
    import shutil

    report = tmp_path / _run_dir(work).name  # a copy of the run's report folder, as promote logs it
    shutil.copytree(cfg.reports_dir / _run_dir(work).name, report)
    rejected = _promote_again(cfg.model_copy(update={"promote": strict}), work, "week-1",
                              report_dir=report)(training_run, out)
    assert not rejected.summary["promoted"] and "beats_baseline" in rejected.summary["reason"]
    assert (report / "recall.md").read_text().splitlines()[1].startswith("**Verdict: NOT PROMOTED: version 1")
    lenient = strict.model_copy(update={"margin": -1.0})
    again = _promote_again(cfg.model_copy(update={"promote": lenient}), work, "week-1",
                           report_dir=report)(training_run, out)
    assert again.summary["promoted"] and again.summary["version"] == "1"
    # the report says what promote decided now, at the top, here and in the copy MLflow holds
    verdict = (report / "recall.md").read_text().splitlines()[1]
    assert verdict.startswith("**Verdict: PROMOTED: version 1 is champion") and "promoted now" in verdict
    assert "Verdict:</b> PROMOTED: version 1" in (report / "report.html").read_text()
    (tmp_path / "download").mkdir()
    logged = client.download_artifacts(client.get_model_version(lenient.model_name, "1").run_id,
                                       f"{report.name}/recall.md", str(tmp_path / "download"))
    assert Path(logged).read_text().splitlines()[1] == verdict
    assert "promoted now under the current gates" in again.summary["reason"]
    assert client.get_model_version(lenient.model_name, "1").tags["clickclip.decision"] == "promoted"
    assert len(client.search_model_versions(f"name='{lenient.model_name}'")) == 1
    # another model name registers anew; the training run's params are never rewritten
    renamed = lenient.model_copy(update={"model_name": "clickclip-renamed"})
    other = _promote_again(cfg.model_copy(update={"promote": renamed}), work, "week-1")(training_run, out)
    assert other.summary["mlflow_run_id"] != training_run
    assert client.get_run(other.summary["mlflow_run_id"]).data.tags["clickclip.training_mlflow_run_id"] == training_run


def test_next_weeks_evaluate_loads_the_champion_in_a_fresh_process(first_and_second_run, tmp_path):
    """What the second weekly run does first, in a process where nothing set MLflow's global URI."""
    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    config = tmp_path / "c.json"
    config.write_text(cfg.model_dump_json())
    code = ("import sys, json; from pathlib import Path; from pipeline.config import RunConfig; "
            "from pipeline.stages.evaluate import champion_model; "
            "cfg = RunConfig.model_validate_json(Path(sys.argv[1]).read_text()); "
            "champion = champion_model(cfg, Path(sys.argv[2]), 'next-week'); print(json.dumps(champion.version))")
    clean = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", code, str(config), str(tmp_path / "download")], capture_output=True,
                         text=True, timeout=300, env=clean)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == "1"


def test_promotion_through_a_real_mlflow_server_on_loopback(first_and_second_run, tmp_path):
    import os
    from pathlib import Path

    import mlflow

    from pipeline.stages.evaluate import champion_model

    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        env={**os.environ, "PATH": _venv_path()}, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_for(f"{uri}/health", server)
        http = cfg.model_copy(update={"promote": cfg.promote.model_copy(update={"tracking_uri": uri})})
        (tmp_path / "promote").mkdir()
        result = _promote_again(http, work)(None, tmp_path / "promote")
        assert result.summary["promoted"] and result.summary["tracking_uri"] == uri
        client = MlflowClient(tracking_uri=uri)
        assert str(client.get_registered_model("clickclip-tiny").aliases["champion"]) == "1"
        # the registry and the proxied artifacts answer over HTTP: evaluate's champion loader works
        champion = champion_model(http, tmp_path / "download")
        bundle, version = champion.bundle, champion.version
        assert version == "1"
        texts = ["navy trainers"]
        np.testing.assert_allclose(embed_texts(bundle, texts),
                                   embed_texts(load_checkpoint(_run_dir(work) / "train" / "model"), texts),
                                   atol=1e-6)
        mlflow.set_tracking_uri(cfg.promote.tracking_uri)  # leave the other tests on their store
    finally:
        _stop(server)
    assert list((tmp_path / "server-artifacts").rglob("text.onnx"))  # artifacts went through the server


def test_search_answers_from_the_champions_index(first_and_second_run, tmp_path):
    from pipeline.search import Searcher

    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    run_dir = _run_dir(work)
    index = json.loads((run_dir / "publish" / "index.json").read_text())
    kept = pl.read_parquet(run_dir / "split" / "images.parquet").height
    assert index["published"] and index["rows"] == kept and index["recall_at_10_vs_exact"] >= 0.95
    assert f"index: {index['table']}" in first.output
    # publish reused evaluate's candidate vectors (same weights, files and titles), and they are
    # what embedding the catalog now gives
    assert (index["reused_vectors"], index["embedded_now"]) == (kept, 0)
    from pipeline.stages.publish import catalog_vectors
    from pipeline.training.model import load_checkpoint

    images = pl.read_parquet(run_dir / "split" / "images.parquet").sort("image_id")
    titles = images["title"].fill_null("").to_list()
    model = run_dir / "train" / "model"
    reused = catalog_vectors(cfg, load_checkpoint(model), model, images, titles, run_dir / "evaluate" /
                             "candidate_vectors.npz")
    fresh = catalog_vectors(cfg, load_checkpoint(model), model, images, titles, None)
    assert reused[3] == kept and fresh[3] == 0
    np.testing.assert_allclose(reused[0], fresh[0], atol=1e-5)
    np.testing.assert_allclose(reused[1], fresh[1], atol=1e-5)
    # a shop without PostgreSQL: the same index, validated the same way, in a FAISS file
    from pipeline.serving.stores import open_store
    from pipeline.stages.publish import publish

    files = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"backend": "faiss"}),
                                   "state_dir": tmp_path / "state"})
    evaluation = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    with pytest.raises(StageError, match="evaluate scored it for backend pgvector"):
        publish(files, "files-run", run_dir / "split" / "images.parquet", run_dir / "split" / "pairs.parquet",
                model, evaluation, True, tmp_path, None, run_dir / "evaluate" / "served_rankings.json")
    evaluation["served_config"]["candidate"]["backend"] = "faiss"  # as evaluate records it with backend: faiss
    reference = json.loads((run_dir / "evaluate" / "served_rankings.json").read_text())
    reference["served_config"]["backend"] = "faiss"
    (tmp_path / "served_rankings.json").write_text(json.dumps(reference))
    built = publish(files, "files-run", run_dir / "split" / "images.parquet", run_dir / "split" / "pairs.parquet",
                    model, evaluation, True, tmp_path, run_dir / "evaluate" / "candidate_vectors.npz",
                    tmp_path / "served_rankings.json")
    assert built["published"] and built["backend"] == "faiss" and built["rows"] == kept
    assert built["recall_at_10_vs_exact"] >= 0.95 and (tmp_path / "state" / files.name / "faiss").is_dir()
    assert built["parity"]["identical"] == built["parity"]["queries"] > 0  # FAISS flat: the same ids, in order
    store = open_store(files.publish, files.state_dir / files.name)
    store.flip(files.promote.model_name, "1", built["table"])
    searcher = Searcher(files)
    try:
        from_file = searcher("navy rain shell", 5)
    finally:
        searcher.close()
    assert from_file["version"] == "1" and from_file["table"] == built["table"] and len(from_file["results"]) == 5
    # the command: JSON with the version that serves
    result = CliRunner().invoke(app, ["search", "--config", str(work / "tiny.yaml"), "navy rain shell", "--k", "5"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)  # stdout holds the JSON alone
    assert answer["version"] == "1" and answer["table"] == index["table"] and len(answer["results"]) == 5
    # held-out queries find images clicked for them, ranked as the record of the serving table says
    test = pl.read_parquet(run_dir / "split" / "pairs.parquet").filter(
        (pl.col("split") == "test") & (pl.col("clicks") > 0))
    clicked = test.group_by("query").agg(pl.col("image_id")).sort("query")
    searcher = Searcher(cfg)
    try:
        hits = sum(bool(set(images) & {r["image_id"] for r in searcher(query, 10)["results"]})
                   for query, images in clicked.iter_rows())
    finally:
        searcher.close()
    assert hits >= 1


def test_publish_refuses_a_replay_that_differs_and_verify_serving_checks_what_serves(first_and_second_run, tmp_path):
    from pipeline.stages.publish import publish

    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    run_dir = _run_dir(work)
    index = json.loads((run_dir / "publish" / "index.json").read_text())
    parity = index["parity"]
    assert parity["identical"] == parity["queries"] > 0 and parity["overlap"] >= cfg.publish.min_recall
    assert index["parity_sentence"] in first.output  # the run's summary prints it
    assert index["parity_sentence"] in (cfg.reports_dir / run_dir.name / "recall.md").read_text().splitlines()[1]
    # what serves now, replayed through the serving version's ONNX text tower
    result = CliRunner().invoke(app, ["verify-serving", "--config", str(work / "tiny.yaml")])
    assert result.exit_code == 0, result.output
    assert f"{parity['queries']}/{parity['queries']} test queries identical top-10" in result.output
    assert "PASSED" in result.output
    # a reference the query path does not reproduce: publish refuses, and so nothing is promoted
    reference = json.loads((run_dir / "evaluate" / "served_rankings.json").read_text())
    reference["rankings"][3] = reference["rankings"][3][::-1]
    reference["served_config"]["backend"] = "faiss"  # published below with backend: faiss
    tampered = tmp_path / "served_rankings.json"
    tampered.write_text(json.dumps(reference))
    evaluation = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    evaluation["served_config"]["candidate"]["backend"] = "faiss"
    files = cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"backend": "faiss"}),
                                   "state_dir": tmp_path / "state"})
    differs = "1 queries came back differently.*" + re.escape(repr(reference["queries"][3]))
    with pytest.raises(StageError, match=differs):
        publish(files, "tampered", run_dir / "split" / "images.parquet", run_dir / "split" / "pairs.parquet",
                run_dir / "train" / "model", evaluation, True, tmp_path, None, tampered)


class Killed(BaseException):
    """A kill -9 at a named point of registry.promotion (BaseException: nothing catches it)."""


def _kill_at(monkeypatch, point):
    from pipeline.registry import promotion

    def reached(at):
        if at == point:
            raise Killed(at)

    monkeypatch.setattr(promotion, "reached", reached)


@pytest.fixture
def two_weeks(first_and_second_run, tmp_path):
    """A fresh registry and index store; week-1 published and champion; week-2 published."""
    from pipeline.serving.stores import open_store
    from pipeline.stages.publish import publish

    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    fresh = cfg.model_copy(update={"promote": cfg.promote.model_copy(update={
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}), "state_dir": tmp_path / "state"})
    run_dir = _run_dir(work)
    evaluation = json.loads((run_dir / "evaluate" / "metrics.json").read_text())

    def index_for(run_id):
        return publish(fresh, run_id, run_dir / "split" / "images.parquet", run_dir / "split" / "pairs.parquet",
                       run_dir / "train" / "model", evaluation, True, tmp_path, None,
                       run_dir / "evaluate" / "served_rankings.json")

    def serving():
        store = open_store(fresh.publish, fresh.state_dir / fresh.name)
        try:
            current = store.serving("clickclip-tiny")
            return current.version, current.table
        finally:
            store.close()

    def promote_week(name, champion=None, index=None):
        (tmp_path / name).mkdir(exist_ok=True)
        return _promote_again(fresh, work, name, champion=champion, index=index)(None, tmp_path / name)

    week1 = index_for("week-1")
    assert promote_week("week-1", index=week1).summary["promoted"]
    assert serving() == ("1", week1["table"])
    return fresh, index_for("week-2"), week1, promote_week, serving


@pytest.mark.parametrize("point", ["registered", "flipped", "tagged", "alias_moved"])
def test_a_kill_at_each_point_of_promotion_is_repaired_by_the_rerun(two_weeks, monkeypatch, point):
    """A kill between the pointer flip and the version tag lost `clickclip.index_table` for good."""
    from pipeline import registry

    fresh, week2, week1, promote_week, serving = two_weeks
    _kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        promote_week("week-2", champion="1", index=week2)
    monkeypatch.undo()
    # meanwhile search serves a version whose index it is: the old one until the flip, then the new one
    assert serving() == (("1", week1["table"]) if point == "registered" else ("2", week2["table"]))
    rerun = promote_week("week-2", champion="1", index=week2)
    assert rerun.summary["promoted"] and rerun.summary["version"] == "2"
    assert serving() == ("2", week2["table"])
    assert registry.aliases(fresh.promote) == {"champion": "2", "previous": "1"}
    assert registry.version_tags(fresh.promote, "2")["clickclip.index_table"] == week2["table"]


def test_a_champion_moved_between_the_check_and_the_alias_flips_serving_back(two_weeks, monkeypatch):
    """The pointer flipped before the alias's compare-and-set failed, leaving search on a version the
    registry did not name."""
    from pipeline import registry
    from pipeline.registry import promotion

    fresh, week2, week1, promote_week, serving = two_weeks

    client = MlflowClient(tracking_uri=fresh.promote.tracking_uri)

    def someone_else_promotes(point):  # a hand-registered version made champion while week-2 promotes
        if point == "tagged":
            other = client.create_model_version("clickclip-tiny", source=str(fresh.state_dir))
            client.set_registered_model_alias("clickclip-tiny", "champion", other.version)

    monkeypatch.setattr(promotion, "reached", someone_else_promotes)
    with pytest.raises(registry.ChampionMoved):
        promote_week("week-2", champion="1", index=week2)
    assert serving() == ("1", week1["table"])  # search serves what it served before, not week-2


@pytest.mark.parametrize("point", ["flipped", "tagged", "alias_moved"])
def test_a_kill_during_rollback_is_repaired_by_rerunning_it(two_weeks, monkeypatch, point):
    """Rollback deleted `previous` before the index followed, so a failed flip could not be rerun."""
    from pipeline import registry
    from pipeline.registry.promotion import rollback

    fresh, week2, week1, promote_week, serving = two_weeks
    assert promote_week("week-2", champion="1", index=week2).summary["promoted"]
    _kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        rollback(fresh, reason="bad in production")
    monkeypatch.undo()
    summary = rollback(fresh, reason="bad in production")
    assert summary["champion"] == "1" and "serves version 1 again" in summary["index"]
    assert serving() == ("1", week1["table"])
    assert registry.aliases(fresh.promote) == {"champion": "1"}
    assert "bad in production" in registry.version_tags(fresh.promote, "2")["clickclip.rolled_back"]


def test_force_builds_validates_and_flips_the_index_before_the_alias_moves(two_weeks, monkeypatch):
    """`promote --force` moved the alias and built no index: search kept serving the old version."""
    from pipeline import registry
    from pipeline.registry import promotion

    fresh, week2, _, promote_week, serving = two_weeks
    _kill_at(monkeypatch, "tagged")
    with pytest.raises(Killed):
        promotion.force(fresh, "1", week2["table"], reason="hotfix")
    monkeypatch.undo()
    assert registry.aliases(fresh.promote) == {"champion": "1"}  # the alias had not moved yet
    forced = promotion.force(fresh, "1", week2["table"], reason="hotfix")
    assert forced["clickclip.decision"] == "forced" and serving() == ("1", week2["table"])


def test_an_image_gone_after_split_is_left_out_by_evaluate_and_publish_alike(tiny_shop, tmp_path):
    """Regression: evaluate left out (and warned about) an image whose file went missing after
    split, while publish crashed on it (UnusableImage missing_file) after the report said promoted."""
    import shutil

    from pipeline.runner import run_stage
    from pipeline.runs import open_run

    shutil.copytree(tiny_shop / "images", tmp_path / "images")
    cfg = shop_config(tiny_shop, tmp_path, train={"epochs": 1}, promote={"margin": -1.0})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_root": tmp_path / "images"})})
    run = open_run(cfg, "gone")
    for stage in ("extract", "split", "train"):
        run_stage(run, stage)
    kept = pl.read_parquet(run.output("split", "images"))
    gone = kept.filter(pl.col("split") == "test").sort("image_id")[0]
    (tmp_path / "images" / gone["path"][0]).unlink()
    evaluation, index = run_stage(run, "evaluate"), run_stage(run, "publish")
    assert evaluation["images_missing"] == index["images_missing"] == gone["image_id"].to_list()
    assert any("gone from" in w for w in evaluation["warnings"]) and any("gone from" in w for w in index["warnings"])
    assert index["published"] and index["rows"] == kept.height - 1
    assert index["parity"]["identical"] == index["parity"]["queries"] > 0


def test_serve_answers_over_http_on_loopback(first_and_second_run):
    import urllib.request

    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", "from pipeline.cli import app; app()", "serve", "--config",
                                str(work / "tiny.yaml"), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/search?q=red%20dress&k=3", timeout=30) as response:
            answer = json.loads(response.read())
        assert answer["version"] == "1" and len(answer["results"]) == 3
    finally:
        _stop(process)


def test_promote_force_builds_and_flips_the_index_of_a_version_the_gates_refused(first_and_second_run, tmp_path):
    """`promote --force` moved the alias and built no index: search kept serving the old version while
    the registry named another. Runs last: it re-decides the shared run folder under other settings."""
    from pipeline import registry
    from pipeline.serving.stores import open_store

    cfg, work, first, _ = first_and_second_run
    assert first.exit_code == 0, first.output
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = ["--set", f"promote.tracking_uri={uri}", "--set", f"state_dir={tmp_path / 'state'}",
                "--set", "promote.margin=0.99"]
    refused = CliRunner().invoke(app, ["run", "--config", str(work / "tiny.yaml"), "--run-id", _run_dir(work).name,
                                       *settings])
    assert refused.exit_code == 0 and "not promoted" in refused.output and "not published" in refused.output
    result = CliRunner().invoke(app, ["promote", "--config", str(work / "tiny.yaml"), "--run-id",
                                      _run_dir(work).name, *settings, "--force", "--reason", "hotfix"])
    assert result.exit_code == 0, result.output
    assert "forced: clickclip-tiny version 1 is champion (hotfix); search serves version 1" in result.output
    forced = cfg.model_copy(update={"promote": cfg.promote.model_copy(update={"tracking_uri": uri}),
                                    "state_dir": tmp_path / "state"})
    tags = registry.version_tags(forced.promote, "1")
    assert tags["clickclip.decision"] == "forced" and registry.aliases(forced.promote) == {"champion": "1"}
    store = open_store(forced.publish, forced.state_dir / forced.name)
    try:
        current = store.serving("clickclip-tiny")
    finally:
        store.close()
    assert (current.version, current.table) == ("1", tags["clickclip.index_table"])
    verdict = (cfg.reports_dir / _run_dir(work).name / "recall.md").read_text().splitlines()[1]
    assert verdict.startswith("**Verdict: PROMOTED: version 1 is champion — FORCED by")


@contextlib.contextmanager
def _served(server) -> Iterator[str]:
    """`clickclip serve`'s app on a loopback port in this process (uvicorn in a thread); its base URL."""
    import threading

    import uvicorn

    from pipeline.search import http_app

    port = free_port()
    running = uvicorn.Server(uvicorn.Config(http_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        running.should_exit = True
        thread.join(10)


def _get(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("shoppers_prefer", ["challenger", "champion"])
def test_a_challenger_is_interleaved_logged_read_out_and_decided_by_the_interleaving_gate(
        first_and_second_run, two_weeks, tmp_path, shoppers_prefer):
    """interleave_first makes the gated week-2 the challenger beside champion 1; serve interleaves
    them over HTTP and logs every response and click; the readout's gate promotes the challenger when
    shoppers click its team's results, and retires it when they click the champion's."""
    from pipeline import registry
    from pipeline.config import InterleaveConfig, ServeConfig
    from pipeline.online import interleave_readout
    from pipeline.search import Server
    from pipeline.stages.extract import extract

    _, work, _, _ = first_and_second_run
    fresh, week2, week1, _, serving = two_weeks
    cfg = fresh.model_copy(update={
        "promote": fresh.promote.model_copy(update={"policy": "interleave_first"}),
        "serve": ServeConfig(impression_log=tmp_path / "log", flush_seconds=0.05,
                             interleave=InterleaveConfig(traffic=1.0, min_queries=40))})
    (tmp_path / "week-2").mkdir()
    decision = _promote_again(cfg, work, "week-2", champion="1", index=week2)(None, tmp_path / "week-2")
    assert not decision.summary["promoted"] and decision.summary["challenger"] == "2"
    assert registry.aliases(cfg.promote) == {"champion": "1", "challenger": "2"}
    assert serving() == ("1", week1["table"])  # the champion still serves every search that is not interleaved
    assert registry.version_tags(cfg.promote, "2")["clickclip.decision"] == "challenger"

    server = Server.open(cfg)
    assert server.challenger is not None and server.challenger.version == "2"
    queries = ["red dress", "blue shoes", "green bag", "black jacket", "white shirt"]
    with _served(server) as url:
        for n in range(60):
            answer = _get(f"{url}/search?q={queries[n % 5].replace(' ', '%20')}&k=6&session=s{n}")
            assert answer["interleaved"] and answer["version"] == "1|2"
            assert {r["team"] for r in answer["results"]} == {"champion", "challenger"}
            liked = next(r for r in answer["results"] if r["team"] == shoppers_prefer)
            assert _post(f"{url}/click", {"request_id": answer["request_id"], "image_id": liked["image_id"],
                                          "dwell_ms": 30_000}) == (200, {"logged": True, "logging": "on"})
        status, refused = _post(f"{url}/click", {"request_id": "20260101-unknown", "image_id": "x"})
        assert status == 404 and "unknown request" in refused["error"]
        health = _get(f"{url}/health")
        assert health["searches"] == health["interleaved"] == 60 and health["challenger_version"] == "2"
        import urllib.request

        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert "clickclip_interleaved 60.0" in metrics and "clickclip_impression_log_stopped 0.0" in metrics
    server.close()  # flushes the log
    assert health["impression_log"]["clicks_logged"] == 60

    # the log is events-contract data: next week's extract reads it as it is
    log_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "events": cfg.data.events.model_copy(update={"path": tmp_path / "log"})})})
    (tmp_path / "extract").mkdir()
    summary = extract(log_cfg, tmp_path / "extract").summary
    assert summary["rows_read"] == 360 and summary["click_rows_joined"] == 60

    read = interleave_readout(cfg, decide=True)
    assert (read["wins"], read["losses"]) == ((60, 0) if shoppers_prefer == "challenger" else (0, 60))
    assert read["decision"] == ("promote" if shoppers_prefer == "challenger" else "retire")
    aliases = registry.aliases(cfg.promote)
    assert "challenger" not in aliases
    tags = registry.version_tags(cfg.promote, "2")
    assert tags["clickclip.interleaving"].startswith("promoted" if shoppers_prefer == "challenger" else "retired")
    if shoppers_prefer == "challenger":
        assert aliases["champion"] == "2" and serving() == ("2", week2["table"])
    else:
        assert aliases["champion"] == "1" and serving() == ("1", week1["table"])
        # a rerun of week-2's promote does not make a retired challenger challenger again
        again = _promote_again(cfg, work, "week-2", champion="1", index=week2)(None, tmp_path / "week-2")
        assert again.summary["challenger"] is None and "challenger" not in registry.aliases(cfg.promote)


def test_simulated_shoppers_run_the_loop_serve_log_readout_and_next_weeks_extract(
        first_and_second_run, two_weeks, tiny_shop, tmp_path):
    """`clickclip simulate`'s shoppers (the demo's queries, clicks by its truth) against serve with a
    challenger, 4 at a time: every search answered, every click logged, the readout counts them,
    and next week's extract reads the log as it is."""
    from pipeline import registry
    from pipeline.config import InterleaveConfig, ServeConfig
    from pipeline.demo.shoppers import simulate
    from pipeline.online import interleave_readout
    from pipeline.search import Server
    from pipeline.stages.extract import extract

    _, work, _, _ = first_and_second_run
    fresh, week2, _, _, _ = two_weeks
    cfg = fresh.model_copy(update={
        "promote": fresh.promote.model_copy(update={"policy": "interleave_first"}),
        "serve": ServeConfig(impression_log=tmp_path / "log", flush_seconds=0.1, swap_rate=0.2,
                             interleave=InterleaveConfig(traffic=0.5, min_queries=10_000))})
    (tmp_path / "week-2").mkdir()
    _promote_again(cfg, work, "week-2", champion="1", index=week2)(None, tmp_path / "week-2")
    server = Server.open(cfg)
    with _served(server) as url:
        shoppers = simulate(url, tiny_shop, searches=200, concurrency=4, k=10, seed=1)
        health = _get(f"{url}/health")
    server.close()
    assert shoppers["errors"] == 0 and shoppers["searches"] == 200 and shoppers["clicks"] > 0
    assert 0 < shoppers["interleaved"] < 200  # half the traffic, by each request's draw
    log = health["impression_log"]
    assert log["clicks_logged"] == shoppers["clicks"] and log["rows_dropped"] == 0

    read = interleave_readout(cfg)
    assert read["searches"] == shoppers["interleaved"] and read["decision"] == "continue"
    assert read["with_clicks"] == read["wins"] + read["losses"] + read["ties"] > 0
    assert registry.version_tags(cfg.promote, "2")["clickclip.interleaving.readout"] == read["sentence"]

    log_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "events": cfg.data.events.model_copy(update={"path": tmp_path / "log"})})})
    (tmp_path / "extract").mkdir()
    summary = extract(log_cfg, tmp_path / "extract").summary
    assert summary["rows_read"] == 200 * 10 and summary["click_rows_joined"] == shoppers["clicks"]
    assert summary["rows_kept"] + summary["rows_quarantined"] + summary["rows_outside_window"] == 2000
    assert summary["propensity_estimate"]["swapped_impressions"] > 0


def _interleaved_log(folder: Path, champion: str, challenger: str, searches: int, clicked_team: str) -> None:
    """Serve's log of `searches` interleaved searches whose shoppers clicked one result of `clicked_team`."""
    from pipeline.serving.impressions import ImpressionLog

    log = ImpressionLog(folder)
    for n in range(searches):
        request = log.shown(f"s{n}", "red dress", f"{champion}|{challenger}",
                            [("a", 1, "champion", None), ("b", 2, "challenger", None)])
        log.clicked(request, "a" if clicked_team == "champion" else "b", 1000)
    log.flush()


@pytest.mark.parametrize("point", ["flipped", "tagged", "alias_moved", "unpointed"])
def test_a_kill_while_the_interleaving_gate_promotes_is_finished_by_the_next_readout(
        first_and_second_run, two_weeks, tmp_path, monkeypatch, point):
    """A kill after the challenger became champion but before its pointer and alias were dropped left
    champion = challenger: the next readout found no searches of that 'pair' and waited forever."""
    from pipeline import registry
    from pipeline.config import InterleaveConfig, ServeConfig
    from pipeline.online import interleave_readout

    _, work, _, _ = first_and_second_run
    fresh, week2, _, _, serving = two_weeks
    cfg = fresh.model_copy(update={
        "promote": fresh.promote.model_copy(update={"policy": "interleave_first"}),
        "serve": ServeConfig(impression_log=tmp_path / "log", interleave=InterleaveConfig(min_queries=20))})
    (tmp_path / "week-2").mkdir()
    _promote_again(cfg, work, "week-2", champion="1", index=week2)(None, tmp_path / "week-2")
    _interleaved_log(tmp_path / "log", "1", "2", 40, "challenger")
    _kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        interleave_readout(cfg, decide=True)
    monkeypatch.undo()
    read = interleave_readout(cfg, decide=True)
    assert read["gate"]["decision"] == "promote" and read["gate"]["changed"]
    assert registry.aliases(cfg.promote) == {"champion": "2", "previous": "1"}
    assert serving() == ("2", week2["table"])
    assert registry.version_tags(cfg.promote, "2")["clickclip.interleaving"].startswith("promoted")
    assert interleave_readout(cfg, decide=True)["challenger"] is None  # nothing left to decide


def test_a_new_challenger_replacing_an_undecided_one_says_so(first_and_second_run, two_weeks, tmp_path):
    from pipeline import registry

    _, work, _, _ = first_and_second_run
    fresh, week2, _, _, _ = two_weeks
    cfg = fresh.model_copy(update={"promote": fresh.promote.model_copy(update={"policy": "interleave_first"})})
    for week in ("week-2", "week-3"):
        (tmp_path / week).mkdir()
        decision = _promote_again(cfg, work, week, champion="1", index=week2)(None, tmp_path / week)
    assert decision.summary["challenger"] == "3" and "version 2, the challenger before it, was replaced" in \
        decision.summary["reason"]
    assert registry.version_tags(cfg.promote, "2")["clickclip.interleaving"] == "replaced by version 3 before a verdict"
    assert registry.aliases(cfg.promote)["challenger"] == "3"
