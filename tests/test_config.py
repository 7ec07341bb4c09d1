from datetime import date
from pathlib import Path

import pytest
import yaml

from pipeline.config import RunConfig, load_config, parse_interval
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_validate():
    for name in ("demo.yaml", "tiny.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert isinstance(cfg, RunConfig)


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((REPO / "configs" / "tiny.yaml").read_text() + "\ntrain:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(path)


def test_overrides_beat_yaml():
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["train.epochs=2", "evaluate.ks=[1, 3]", "promote.metric=recall@3"])
    assert cfg.train.epochs == 2
    assert cfg.evaluate.ks == (1, 3)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.epochs"])


@pytest.mark.parametrize("table", ["events; DROP TABLE x", "a.b", "1abc", 'x"y'])
def test_duckdb_table_must_be_plain_identifier(tmp_path, table):
    path = tmp_path / "c.yaml"
    path.write_text(f"""
data:
  events: {{format: duckdb, path: shop.duckdb, table: '{table}'}}
  images: {{path: images.parquet}}
  image_root: images
""")
    with pytest.raises(ConfigError, match="plain SQL identifier"):
        load_config(path)


def test_split_fractions_must_sum_to_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text((REPO / "configs" / "tiny.yaml").read_text()
                    + "\nsplit:\n  fractions: {train: 0.8, val: 0.3, test: 0.1}\n")
    with pytest.raises(ConfigError, match="add up to 1"):
        load_config(path)


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", 16])
def test_float16_precision_is_refused_with_what_to_use_instead(precision):
    with pytest.raises(ConfigError, match=r"train\.precision.*use 'bf16-mixed'"):
        load_config(REPO / "configs" / "tiny.yaml", [f"train.precision={precision}"])


def test_promote_metric_must_be_one_evaluate_computes():
    with pytest.raises(ConfigError, match=r"promote.metric 'recall@20'.*recall@10"):
        load_config(REPO / "configs" / "tiny.yaml", ["promote.metric=recall@20"])
    assert load_config(REPO / "configs" / "tiny.yaml", ["promote.metric=ndcg@10"]).promote.metric == "ndcg@10"


@pytest.mark.parametrize("run_id", ["../outside", "/tmp/abs", "a/b", "..", ".hidden", "x" * 129])
def test_run_ids_are_plain_names(tiny_config, run_id):
    from pipeline.runs import open_run

    with pytest.raises(ConfigError, match="plain name"):
        open_run(tiny_config, run_id)
    assert not (tiny_config.runs_dir.parent / "outside").exists()


def test_resource_settings_change_no_fingerprint_and_no_default_run_id(tiny_config):
    from pipeline.runs import open_run

    stages = ("extract", "split", "train", "evaluate", "promote")
    before = open_run(tiny_config)
    faster = tiny_config.model_copy(update={
        "extract": tiny_config.extract.model_copy(update={"duckdb": {"memory_limit": "8GB", "threads": 1}}),
        "train": tiny_config.train.model_copy(update={"num_workers": 3}),
        "evaluate": tiny_config.evaluate.model_copy(update={"decode_workers": 2, "batch_size": 7})})
    after = open_run(faster)
    assert after.run_id == before.run_id
    assert [after.fingerprint(s) for s in stages] == [before.fingerprint(s) for s in stages]


@pytest.mark.parametrize(("key", "suggestion"), [
    ("train.epoch", "train.epochs"), ("evaluate.galery", "evaluate.gallery"),
    ("promote.gates.min_candiate", "promote.gates.min_candidate")])
def test_an_unknown_key_suggests_the_closest_known_one(key, suggestion):
    with pytest.raises(ConfigError, match=rf"{key}: .*did you mean '{suggestion}'"):
        load_config(REPO / "configs" / "tiny.yaml", [f"{key}=3"])


def test_help_texts_are_right_for_each_subcommand():
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    extract = runner.invoke(app, ["extract", "--help"]).output
    assert "must have run" not in extract  # extract has no earlier stage
    assert "(extract must have run)" in runner.invoke(app, ["split", "--help"]).output
    for command in ("extract", "train", "promote", "run", "rollback", "demo-data", "migrate-split-registry"):
        text = runner.invoke(app, [command, "--help"]).output
        assert "<bool>" not in text and "--help" in text, command


def test_init_writes_a_config_for_a_shops_own_data(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "configs" / "acme.yaml"
    args = ["init", "--out", str(out), "--name", "acme", "--events", str(tmp_path / "shop.duckdb"),
            "--events-table", "clicks", "--images", str(tmp_path / "catalog.parquet"), "--image-root", "images"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    cfg = load_config(out)
    assert cfg.name == "acme" and cfg.promote.model_name == "acme" and cfg.evaluate.gallery == "catalog"
    assert cfg.data.events.format == "duckdb" and cfg.data.events.table == "clicks"
    assert cfg.train.model == "ViT-B-32" and cfg.extract.window.last_days == 28
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output


def _init(tmp_path, events: Path) -> Path:
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "shop.yaml"
    done = CliRunner().invoke(app, ["init", "--out", str(out), "--events", str(events)])
    assert done.exit_code == 0, done.output
    return out


@pytest.mark.parametrize("window", [None, {"last_days": 28}, {"since": "2026-01-01"},
                                    {"since": "2026-01-01", "until": "2026-02-01"}, {"until": "2026-03-01"}])
def test_the_data_interval_replaces_any_window_that_loads(tmp_path, window):
    """The DAG passes --data-interval FIRST/LAST; every window a config may hold loads under it (init's
    last_days 28 used to fail: the DAG set since beside it). The window ends on LAST and starts on
    FIRST, or last_days before LAST."""
    (tmp_path / "events" / "date=2026-11-02").mkdir(parents=True)
    path = _init(tmp_path, tmp_path / "events")
    text = path.read_text()
    assert "last_days: 28" in text and "incremental: true" in text  # a folder of partitions: incremental
    tree = yaml.safe_load(text)
    tree["extract"]["window"] = window
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path, ["extract.weighting=raw"], (date(2026, 11, 2), date(2026, 11, 8)))
    last_days = (window or {}).get("last_days")
    assert cfg.extract.window.until == date(2026, 11, 8)
    assert cfg.extract.window.since == (None if last_days else date(2026, 11, 2))
    assert cfg.extract.window.last_days == last_days
    assert cfg.extract.weighting == "raw"
    assert parse_interval("2026-11-02/2026-11-08") == (date(2026, 11, 2), date(2026, 11, 8))
    for wrong in ("2026-11-02", "2026-11-08/2026-11-02", "monday/sunday"):
        with pytest.raises(ConfigError, match="--data-interval"):
            parse_interval(wrong)


def test_init_turns_incremental_extract_on_only_for_date_partitions(tmp_path):
    """A flat folder of Parquet files has no date= partitions, which incremental extract refuses:
    init's config for it must run as written."""
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "part-0.parquet").write_bytes(b"")
    assert not load_config(_init(tmp_path, tmp_path / "flat")).extract.incremental


def test_mistakes_are_named_by_the_cli(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    typo = runner.invoke(app, ["run", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", "train.epoch=3"])
    assert typo.exit_code == 2 and "did you mean 'train.epochs'" in " ".join(typo.output.split())
    missing = runner.invoke(app, ["run", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "nope.yaml does not exist" in " ".join(missing.output.split())


def test_ddp_takes_grad_cache_but_not_the_memory_bank_and_several_machines_need_ddp():
    tiny = REPO / "configs" / "tiny.yaml"
    cfg = load_config(tiny, ["train.strategy=ddp", "train.negatives=grad_cache", "train.num_nodes=2"])
    assert (cfg.train.strategy, cfg.train.negatives, cfg.train.num_nodes) == ("ddp", "grad_cache", 2)
    with pytest.raises(ConfigError, match="memory bank is single-process"):
        load_config(tiny, ["train.strategy=ddp", "train.negatives=memory_bank"])
    with pytest.raises(ConfigError, match="num_nodes is 2: .*needs strategy 'ddp'"):
        load_config(tiny, ["train.num_nodes=2"])
