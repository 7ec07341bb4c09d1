"""The whole pipeline on a tiny demo shop, through the CLI, twice."""

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.model import embed_texts, load_checkpoint
from tests.conftest import shop_config

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
    for stage in ("extract", "split", "train", "evaluate", "promote"):
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
