"""`clickclip` command line: thin shells over the stage cores in pipeline/."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipeline.errors import ClickclipError, NothingServes, Stopped
from pipeline.stages import STAGE_NAMES, stage_spec

# plain help (no type names such as `--help <bool>`); tracebacks never print local variables, which
# can hold a tracking URI with its credentials
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_show_locals=False,
                  help="Retrain CLIP image-text search models on e-commerce click logs.")
console = Console(stderr=True)

@app.callback()
def _mask_credentials() -> None:
    """Every command: credentials in URIs are masked in all this process prints, tracebacks and
    library logs included."""
    from pipeline.runner import RedactingStream

    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    # one plain handler for library logs, on the masked stderr, before any library installs its own
    # (Lightning then logs through it instead of printing every line twice)
    logging.basicConfig(format="%(message)s", stream=sys.stderr)


ConfigOption = Annotated[Path, typer.Option("--config", "-c", metavar="FILE", help="run config YAML (see configs/)")]
RunIdOption = Annotated[str | None, typer.Option(
    "--run-id", metavar="ID",
    help="run folder name under runs_dir (a plain name); default: <name>-<hash of the inputs and the settings "
         "that change a figure>")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="override a config key, e.g. --set train.epochs=2 (repeatable)")]


def _fail(exc: ClickclipError) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _stopped(stop: Stopped) -> None:
    """A stop is not a success: say what was left, and exit 128 + the signal (143 for SIGTERM)."""
    where = f" during {stop.stage}" if stop.stage else ""
    kept = "; its partial folder is kept and the same command resumes it" if stop.stage else ""
    console.print(f"[bold red]stopped[/] by {signal.Signals(stop.signum).name}{where}{kept}")
    raise typer.Exit(code=stop.exit_code)


JsonOption = Annotated[bool, typer.Option(
    "--json", help="print the summary as one JSON line (for schedulers and scripts) instead of a few lines of text")]


def _emit(summary: dict, as_json: bool, text: str | None = None) -> None:
    """The command's summary on stdout: one JSON line with --json, else a short text for people."""
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        print(text if text is not None else "\n".join(f"{key}: {value}" for key, value in summary.items()
                                                      if not isinstance(value, dict | list)))


IntervalOption = Annotated[str | None, typer.Option(
    "--data-interval", metavar="FIRST/LAST",
    help="a scheduler's data interval (inclusive dates, e.g. 2026-11-02/2026-11-08); it replaces the configured "
         "window: the window ends on LAST and starts on FIRST, or extract.window.last_days before LAST")]


def _open(config: Path, run_id: str | None, overrides: list[str] | None, interval: str | None = None):
    from pipeline.config import load_config, parse_interval
    from pipeline.runs import open_run

    return open_run(load_config(config, overrides or [], parse_interval(interval) if interval else None), run_id)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(metavar="FOLDER", help="folder to write the demo shop into")] = Path("data/demo"),
    products: Annotated[int, typer.Option(min=10, metavar="N", help="catalog products")] = 600,
    sessions: Annotated[int, typer.Option(min=10, metavar="N", help="search sessions in the click log (per week "
                                                                   "with --weeks)")] = 20000,
    seed: Annotated[int, typer.Option(metavar="N", help="random seed: the same seed, the same shop")] = 0,
    weeks: Annotated[int, typer.Option(min=0, metavar="N", help="a shop that changes over N weeks (new, retired "
                                                                 "and re-shot products, seasonal queries, one bad "
                                                                 "week), standing at week 1; move it on with "
                                                                 "`clickclip demo-advance`")] = 0,
    bad_week: Annotated[int, typer.Option(metavar="K", help="with --weeks: the week with a day of scraper traffic "
                                                           "(0: none)")] = 4,
    force: Annotated[bool, typer.Option(help="regenerate even if the folder already holds demo data")] = False,
) -> None:
    """Generate a demo catalog and click log in the input data contract's format."""
    if (out / "images.parquet").is_file() and not force:
        console.print(f"demo data already in {out} (use --force to regenerate)")
        return
    if weeks:
        from pipeline.demo.season import generate_season

        try:
            season = generate_season(out, weeks, products=products, sessions=sessions, seed=seed,
                                     bad_week=bad_week or None)
        except ClickclipError as exc:
            _fail(exc)
        console.print(f"wrote a {weeks}-week season to {out}/season (bad week: {season.bad_week or 'none'}); the "
                      f"shop in {out} stands at week 1: `clickclip demo-advance --out {out} --week 2` moves it on")
        return
    from pipeline.demo.shop import generate

    summary = generate(out, products=products, sessions=sessions, seed=seed)
    console.print(f"wrote {summary.images} images of {summary.products} products, {summary.impressions} "
                  f"impressions and {summary.planted_duplicates} planted near-duplicates to {out}")


@app.command("demo-advance")
def demo_advance(
    week: Annotated[int, typer.Option(min=1, metavar="K", help="the week to move the shop to")],
    out: Annotated[Path, typer.Option(metavar="FOLDER", help="the shop `demo-data --weeks` wrote")] = Path("data/demo"),
) -> None:
    """Move a demo season's shop forward to the end of week K: its log, catalog and image folder."""
    from pipeline.demo.season import advance

    try:
        advance(out, week)
    except ClickclipError as exc:
        _fail(exc)
    console.print(f"the shop in {out} stands at the end of week {week}")


def _stage_command(stage: str):
    def command(config: ConfigOption, run_id: RunIdOption = None, set_: SetOption = None,
                data_interval: IntervalOption = None, as_json: JsonOption = False) -> None:
        from pipeline.runner import run_stage, stage_report

        try:
            run = _open(config, run_id, set_, data_interval)
            summary = run_stage(run, stage)
        except ClickclipError as exc:
            _fail(exc)
        except Stopped as stop:
            _stopped(stop)
        _emit(summary, as_json, stage_report(run, stage, summary))

    spec = stage_spec(stage)
    needs = f" ({', '.join(spec.upstream)} must have run)" if spec.upstream else ""
    command.__doc__ = f"Run the {stage} stage of one run{needs}: {spec.doc}."
    return command


for _stage in STAGE_NAMES:
    if _stage != "promote":  # promote has its own command below, with --force
        app.command(_stage)(_stage_command(_stage))


@app.command("promote")
def promote(
    config: ConfigOption, run_id: RunIdOption = None, set_: SetOption = None, data_interval: IntervalOption = None,
    force: Annotated[bool, typer.Option(help="make this run's version champion even if its gates failed: its index "
                                              "is built and validated (replay included) first, or nothing moves")
                     ] = False,
    reason: Annotated[str, typer.Option(metavar="TEXT",
                                        help="why (required with --force; recorded on the version)")] = "",
    as_json: JsonOption = False,
) -> None:
    """Register the run's model and move `champion` if it wins; --force promotes by hand."""
    from pipeline.runner import force_promote, run_stage, stage_report

    try:
        if force and not reason.strip():
            raise ClickclipError("--force needs --reason: say why the gates are overridden")
        run = _open(config, run_id, set_, data_interval)
        summary = run_stage(run, "promote")
        text = stage_report(run, "promote", summary)
        if force:
            summary = force_promote(run, summary, reason)
            text = (f"forced: {summary['model_name']} version {summary['champion']} is champion ({reason})"
                    + (f"; {summary['index']}" if summary.get("index") else ""))
    except ClickclipError as exc:
        _fail(exc)
    except Stopped as stop:
        _stopped(stop)
    _emit(summary, as_json, text)


@app.command("rollback")
def rollback(
    config: ConfigOption, set_: SetOption = None,
    reason: Annotated[str, typer.Option(metavar="TEXT", help="why; recorded on the rolled-back version")] = "",
    as_json: JsonOption = False,
) -> None:
    """Point search and `champion` back at the `previous` version (its index first); refuses, changing
    nothing, when `previous` has no index to serve. Rerun it to finish an interrupted rollback."""
    from pipeline.config import load_config
    from pipeline.registry.promotion import rollback as roll_back

    try:
        summary = roll_back(load_config(config, set_ or []), reason)
    except ClickclipError as exc:
        _fail(exc)
    rolled = (f"version {summary['rolled_back']} rolled back" if summary["rolled_back"] else
              "an interrupted rollback completed")
    _emit(summary, as_json, f"{summary['model_name']}: champion is version {summary['champion']} again ({rolled})"
                            + (f"; {summary['index']}" if summary.get("index") else ""))


@app.command("search")
def search(
    config: ConfigOption,
    query: Annotated[str, typer.Argument(help="what a shopper types")],
    k: Annotated[int, typer.Option("--k", min=1, max=1000, help="results to return")] = 20,
    set_: SetOption = None,
) -> None:
    """Search the catalog as production serves it: the champion's index and text tower (JSON)."""
    from pipeline.config import load_config
    from pipeline.search import Searcher, dumps

    try:
        searcher = Searcher(load_config(config, set_ or []))
        try:
            result = searcher(query, k)
        finally:
            searcher.close()
    except NothingServes as exc:  # the gates have not promoted anything yet: said, exit 3 (not 2, a fault)
        console.print(f"[bold yellow]nothing to search:[/] {exc}")
        raise typer.Exit(code=3) from None
    except ClickclipError as exc:
        _fail(exc)
    print(dumps(result))


@app.command("verify-serving")
def verify_serving(config: ConfigOption, set_: SetOption = None, as_json: JsonOption = False) -> None:
    """Replay the serving version's test queries through the query path and compare with what evaluate
    scored: identical with exact search, overlapping through HNSW. Exits 1 when parity fails."""
    from pipeline.config import load_config
    from pipeline.search import verify_serving as verify

    try:
        summary = verify(load_config(config, set_ or []))
    except ClickclipError as exc:
        _fail(exc)
    _emit(summary, as_json, f"{summary['model_name']} version {summary['version']} ({summary['table']}): "
                            f"{summary['sentence']} — {'PASSED' if summary['passed'] else 'FAILED'}")
    if not summary["passed"]:
        raise typer.Exit(1)


@app.command("serve")
def serve(
    config: ConfigOption,
    host: Annotated[str, typer.Option(help="address to bind; loopback unless you mean to expose it")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8088,
    set_: SetOption = None,
) -> None:
    """Answer GET /search?q=...&k=20 over HTTP with the champion's index and text tower, interleaved
    with the challenger's when there is one; log every response and POST /click to serve's impression log."""
    import uvicorn

    from pipeline.config import load_config
    from pipeline.search import Server, http_app

    try:
        server = Server.open(load_config(config, set_ or []))
    except ClickclipError as exc:
        _fail(exc)
    health = server.health()
    challenger = (f", interleaved with challenger version {health['challenger_version']} on "
                  f"{health['interleave_traffic']:.0%} of searches" if health["challenger_version"] else "")
    log = health["impression_log"]
    console.print(f"serving {health['model_name']} version {health['version']}{challenger} on "
                  f"http://{host}:{port}/search; impressions logged to "
                  f"{log['folder'] if log['logging'] != 'off' else '(off: serve.log_impressions is false)'}")
    try:
        uvicorn.run(http_app(server), host=host, port=port, log_level="warning")
    finally:
        server.close()


@app.command("interleave-readout")
def interleave_readout(
    config: ConfigOption,
    decide: Annotated[bool, typer.Option(
        "--decide", help="apply the interleaving gate: promote the challenger when the preference's lower bound "
                         "is above zero, retire it when the upper bound is below zero (after "
                         "serve.interleave.min_queries searches with a click)")
    ] = False,
    set_: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Read serve's impression log: how the challenger fares against the champion in interleaved
    searches (wins, losses, ties, the preference with a 95% interval, searches still needed)."""
    from pipeline.config import load_config
    from pipeline.online import interleave_readout as read

    try:
        summary = read(load_config(config, set_ or []), decide)
    except ClickclipError as exc:
        _fail(exc)
    gate = summary.get("gate")
    moved = f"\ngate: {gate['decision']}" + (f" — {gate.get('note', '')}" if gate.get("note") else "") if gate else ""
    _emit(summary, as_json, f"{summary['model_name']}: {summary['sentence']}" if summary["challenger"] is None else
          f"{summary['model_name']}: challenger version {summary['challenger']} against champion "
          f"{summary['champion']}: {summary['sentence']}{moved}")


@app.command("simulate")
def simulate(
    shop: Annotated[Path, typer.Option("--shop", help="a shop written by `clickclip demo-data` (its truth/ folder)")],
    url: Annotated[str, typer.Option(help="a running `clickclip serve`")] = "http://127.0.0.1:8088",
    searches: Annotated[int, typer.Option(min=1, help="shoppers, one search each")] = 1000,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="shoppers at a time")] = 1,
    k: Annotated[int, typer.Option("--k", min=1, max=1000)] = 10,
    seed: int = 0,
    seconds: Annotated[float | None, typer.Option(help="stop starting shoppers after this long")] = None,
    as_json: JsonOption = False,
) -> None:
    """Send simulated shoppers to `clickclip serve`: the demo's queries, clicks by the demo's truth
    and position-based click model (posted to /click), so serve's log feeds next week's extract."""
    from pipeline.demo.shoppers import simulate as run

    try:
        summary = run(url, shop, searches, concurrency, k, seed, seconds)
    except ClickclipError as exc:
        _fail(exc)
    latency = summary["latency_ms"]
    _emit(summary, as_json, f"{summary['searches']} searches ({summary['interleaved']} interleaved), "
                            f"{summary['clicks']} clicks, {summary['errors']} errors in {summary['seconds']} s; "
                            f"latency p50 {latency['p50']} ms, p95 {latency['p95']} ms"
                            + (f"; first error: {summary['first_error']}" if summary["first_error"] else ""))
    if summary["errors"]:
        raise typer.Exit(1)


@app.command("migrate-split-registry")
def migrate_split_registry(config: ConfigOption, set_: SetOption = None, as_json: JsonOption = False) -> None:
    """Adopt the config's near-duplicate settings (split.hash, hash_size, max_distance) for the sticky
    split registry. Every assignment is kept; groups that now link splits follow split.link_policy."""
    from pipeline.config import load_config
    from pipeline.stages.split import migrate_registry

    try:
        summary = migrate_registry(load_config(config, set_ or []))
    except ClickclipError as exc:
        _fail(exc)
    _emit(summary, as_json, f"split registry {summary['registry']}: {summary['images']} assignments kept; near-"
                            f"duplicate settings now {summary['settings_now']} (were {summary['settings_before']})")


@app.command("init")
def init(
    out: Annotated[Path, typer.Option(metavar="FILE", help="where to write the config")] = Path("configs/myshop.yaml"),
    name: Annotated[str, typer.Option(metavar="NAME", help="names the runs, the state and the model")] = "myshop",
    events: Annotated[Path, typer.Option(metavar="PATH", help="the click log (Parquet, CSV or DuckDB file)")] = Path(
        "data/events"),
    images: Annotated[Path, typer.Option(metavar="PATH", help="the catalog table")] = Path("data/images.parquet"),
    image_root: Annotated[Path, typer.Option(metavar="FOLDER", help="the folder catalog paths are relative to")] = Path(
        "data/images"),
    events_table: Annotated[str | None, typer.Option(metavar="TABLE", help="when --events is DuckDB")] = None,
    images_table: Annotated[str | None, typer.Option(metavar="TABLE", help="when --images is DuckDB")] = None,
    model: Annotated[str, typer.Option(metavar="MODEL", help="an open_clip model config")] = "ViT-B-32",
    pretrained: Annotated[Path | None, typer.Option(metavar="FILE", help="its local pretrained weights")] = None,
) -> None:
    """Write a starting config for your own data, checked as clickclip will read it."""
    from pipeline.config import load_config, starting_config

    if out.exists():
        _fail(ClickclipError(f"{out} already exists: choose another --out, or edit that file"))
    try:
        text = starting_config(name, events, images, image_root, events_table, images_table, model, pretrained)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        load_config(out)
    except ClickclipError as exc:
        out.unlink(missing_ok=True)
        _fail(exc)
    if pretrained is None:
        console.print(f"[bold yellow]warning:[/] no --pretrained: {model} will start from random weights, which is "
                      "slow to train on a CPU and generalises poorly; set train.pretrained to a local weights file")
    console.print(f"wrote {out}; check the data block, then: clickclip run --config {out}")


@app.command("run")
def run(config: ConfigOption, run_id: RunIdOption = None, set_: SetOption = None,
        data_interval: IntervalOption = None) -> None:
    """Run every stage in order, reusing any whose inputs and config are unchanged."""
    from pipeline.runner import format_summary, run_all

    try:
        run = _open(config, run_id, set_, data_interval)
        summaries = run_all(run)
    except ClickclipError as exc:
        _fail(exc)
    except Stopped as stop:
        _stopped(stop)
    print(format_summary(run, summaries))


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
