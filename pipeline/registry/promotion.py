"""Promotion: the one place a version's serving state changes, for `promote`, `promote --force` and
`rollback` alike.

States of a registered version (each recorded where a later run can read it back):
- **registered**: the promote stage logged the run and created the version, with its served
  configuration (`clickclip.served_config`) and the gates' verdict (`clickclip.decision`:
  promoted | rejected) as tags: it is **gated**.
- **published**: the publish stage built its index table, recorded the served configuration with
  it, and proved replay parity (before any registry write; the table is named by the run, so a
  rebuild rewrites it whole).
- **champion**: the serving pointer names its table (**flip**), the version carries the table's
  name (`clickclip.index_table`, **tag**), and the `champion` alias points at it (**alias**; the
  former champion becomes `previous`). Always in this order: search serves what the alias names
  or the former champion, never an alias without an index.
- **forced**: champion past failed gates, by hand: its index is built and validated by publish
  first (or the command refuses), then the same flip, tag, alias; `clickclip.decision: forced`
  with who and why.
- **challenger** (`promote.policy: interleave_first`): gated and published like a champion, but
  the challenger's pointer (`serving.index.challenger_key`) names its table, the version carries
  the table's name, and the `challenger` alias points at it; serve interleaves it with the
  champion. The interleaving gate then either makes it champion (the champion's steps, alias
  compare-and-set against the champion it was interleaved with) or retires it
  (`clickclip.interleaving: retired ...`); either way the challenger pointer and alias go last.
- **rolled back**: the pointer goes back to `previous`'s table (refused when it has none), the
  rolled-back version is tagged `clickclip.rolled_back` (never promoted again by a rerun), the
  `champion` alias moves to `previous`, and `previous` is deleted last.

A kill at any point between these steps (`KILL_POINTS`, after each) leaves a state the same
command completes when rerun: every step is idempotent and checked before it is taken.
"""

from __future__ import annotations

from pipeline import registry
from pipeline.config import RunConfig
from pipeline.errors import StageError
from pipeline.serving.index import challenger_key
from pipeline.serving.stores import open_store

INDEX_TAG = "clickclip.index_table"
INTERLEAVING_TAG = "clickclip.interleaving"  # the interleaving gate's verdict on a challenger
KILL_POINTS = ("registered", "flipped", "tagged", "alias_moved")


def reached(point: str) -> None:
    """Called after each step: the seam the kill tests interrupt (does nothing in production)."""


def _flip(cfg: RunConfig, version: str, table: str) -> bool:
    """Point serving at (version, table) unless it already is; True when it flipped."""
    store = open_store(cfg.publish, cfg.state_dir / cfg.name)
    try:
        current = store.serving(cfg.promote.model_name)
        if current is not None and (current.version, current.table) == (version, table):
            return False
        store.flip(cfg.promote.model_name, version, table)
        store.drop_old(cfg.promote.model_name, cfg.publish.keep_versions)
        return True
    finally:
        store.close()


def _serving(cfg: RunConfig) -> tuple[str, str] | None:
    store = open_store(cfg.publish, cfg.state_dir / cfg.name)
    try:
        current = store.serving(cfg.promote.model_name)
        return (current.version, current.table) if current else None
    finally:
        store.close()


def _tag(cfg: RunConfig, version: str, table: str) -> bool:
    if registry.version_tags(cfg.promote, version).get(INDEX_TAG) == table:
        return False
    registry.set_version_tags(cfg.promote, version, {INDEX_TAG: table})
    return True


def make_champion(cfg: RunConfig, version: str, table: str | None, expected_champion: str | None) -> str:
    """Flip, tag, alias for a gated version (`table`: its published index, None when publishing is
    off). The alias moves only while it still names `expected_champion` (compare-and-set), checked
    before the flip too, so a moved champion flips nothing. Returns a note for the reason."""
    pcfg = cfg.promote
    if cfg.publish.enabled and table is None:
        raise StageError(f"not promoting version {version}: publishing is on but no index was published for it, "
                         "and moving the alias alone would leave search serving another version; rerun publish")
    champion = registry.champion_version(pcfg)
    if champion not in (expected_champion, version):
        raise registry.ChampionMoved(
            f"not promoting {pcfg.model_name} version {version}: it was evaluated against champion "
            f"{expected_champion or '(none)'}, but the registry's champion is now {champion or '(none)'}. Rerun the "
            "pipeline (clickclip run) so evaluate compares against the new champion")
    flipped = tagged = False
    before = _serving(cfg) if table is not None else None
    if table is not None:
        flipped = _flip(cfg, version, table)
        reached("flipped")
        tagged = _tag(cfg, version, table)
        reached("tagged")
    moved = champion != version
    if moved:
        try:
            registry.promote_version(pcfg, version, expected_champion=expected_champion)
        except registry.ChampionMoved:
            if flipped and before is not None:  # the alias moved since the check: serve what it names again
                _flip(cfg, *before)
            raise
    reached("alias_moved")
    if table is None:
        return ""
    if moved or flipped:
        return f"; search now serves version {version} from index {table}"
    return "; the interrupted index tag was completed" if tagged else ""


def ensure_serving(cfg: RunConfig, version: str, table: str | None) -> str:
    """For the champion: the pointer and the tag as make_champion leaves them (a rerun repairs a
    kill after the alias moved, or a flip undone by hand)."""
    if table is None:
        return ""
    flipped, tagged = _flip(cfg, version, table), _tag(cfg, version, table)
    if flipped:
        return f"; the interrupted index flip was completed: search serves version {version} from index {table}"
    return "; the interrupted index tag was completed" if tagged else ""


def force(cfg: RunConfig, version: str, table: str | None, reason: str) -> dict:
    """Champion past failed gates: `table` must be the version's built and validated index (publish
    with the gates overridden) when publishing is on; flip, tag, then the alias, no compare-and-set."""
    if not reason.strip():
        raise StageError("a forced promotion needs --reason: say why the gates are overridden")
    if cfg.publish.enabled and table is None:
        raise StageError(f"not forcing version {version}: it has no validated index to serve (publish did not build "
                         "one), and moving the alias alone would leave search serving another version")
    if table is not None:
        _flip(cfg, version, table)
        reached("flipped")
        _tag(cfg, version, table)
        reached("tagged")
    tags = registry.force_promote(cfg.promote, version, reason)
    reached("alias_moved")
    return tags | ({"index": f"search serves version {version} from index {table}"} if table else {})


def rollback(cfg: RunConfig, reason: str = "") -> dict:
    """Champion back to `previous`: pointer to its table, tag the rolled-back version, alias, then
    drop `previous`. Refuses before any change when `previous` has no index to serve."""
    pcfg = cfg.promote
    aliases = registry.aliases(pcfg)
    if "previous" not in aliases:
        raise StageError(f"model {pcfg.model_name!r} has no 'previous' version to roll back to")
    current, previous = aliases.get("champion"), aliases["previous"]
    table = registry.version_tags(pcfg, previous).get(INDEX_TAG) if cfg.publish.enabled else None
    if cfg.publish.enabled:
        store = open_store(cfg.publish, cfg.state_dir / cfg.name)
        try:
            usable = table is not None and store.exists(table) and store.record(table) is not None
        finally:
            store.close()
        if not usable:
            raise StageError(f"not rolling back to version {previous}: it has no index to serve "
                             f"({'none was published' if table is None else table + ' is gone or unrecorded'}); "
                             "nothing was changed. Rerun publish for its run, or promote --force another version")
        _flip(cfg, previous, table)
        reached("flipped")
    rolled_back = current if current not in (previous, None) else None  # None: a rerun after the alias moved
    if rolled_back is not None:
        registry.set_version_tags(pcfg, rolled_back, {"clickclip.rolled_back":
                                                      f"by {registry.who()}: {reason or 'no reason given'}"})
        reached("tagged")
    if current != previous:
        registry.set_alias(pcfg, "champion", previous)
        reached("alias_moved")
    registry.delete_alias(pcfg, "previous")
    return {"model_name": pcfg.model_name, "champion": str(previous), "rolled_back": rolled_back,
            "index": f"search serves version {previous} again (index {table})" if table else ""}


def make_challenger(cfg: RunConfig, version: str, table: str | None) -> str:
    """Challenger pointer, tag, then the `challenger` alias for a gated, published version. A former
    challenger still undecided is tagged as replaced (and the reason says so)."""
    if table is None:
        raise StageError(f"not making version {version} the challenger: it has no published index for serve to "
                         "interleave (publishing is off, or publish built none); rerun publish")
    pcfg = cfg.promote
    former = registry.aliases(pcfg).get("challenger")
    note = ""
    if former is not None and former != version:
        registry.set_version_tags(pcfg, former, {INTERLEAVING_TAG: f"replaced by version {version} before a verdict"})
        note = f" (version {former}, the challenger before it, was replaced before interleaving decided)"
    store = open_store(cfg.publish, cfg.state_dir / cfg.name)
    try:
        key = challenger_key(pcfg.model_name)
        current = store.serving(key)
        if current is None or (current.version, current.table) != (version, table):
            store.flip(key, version, table)
    finally:
        store.close()
    reached("flipped")
    _tag(cfg, version, table)
    reached("tagged")
    registry.set_alias(pcfg, "challenger", version)
    reached("alias_moved")
    return f"; version {version} is the challenger: serve interleaves it with the champion (index {table}){note}"


def challenger(cfg: RunConfig) -> tuple[str, str] | None:
    """(version, table) of the challenger the pointer names, or None."""
    store = open_store(cfg.publish, cfg.state_dir / cfg.name)
    try:
        current = store.serving(challenger_key(cfg.promote.model_name))
        return (current.version, current.table) if current else None
    finally:
        store.close()


def _drop_challenger(cfg: RunConfig) -> None:
    """The challenger's pointer, then its alias: what serve interleaves goes first."""
    store = open_store(cfg.publish, cfg.state_dir / cfg.name)
    try:
        store.unpoint(challenger_key(cfg.promote.model_name))
    finally:
        store.close()
    reached("unpointed")
    registry.delete_alias(cfg.promote, "challenger")


def end_challenger(cfg: RunConfig, decision: str, sentence: str, champion: str | None) -> dict:
    """The interleaving gate's move: 'promote' makes the challenger champion (the champion's steps,
    compare-and-set against `champion`, the one it was interleaved with), then tags it; 'retire' tags
    it; both then drop the challenger's pointer and alias. 'continue' changes nothing. A run cut
    short is finished by the next: a challenger that is champion already, or tagged retired, is
    dropped without reading the log again."""
    pcfg = cfg.promote
    current = challenger(cfg)
    aliases = registry.aliases(pcfg)
    version = current[0] if current else aliases.get("challenger")
    if version is None:
        raise StageError(f"model {pcfg.model_name!r} has no challenger to decide on")
    outcome = {"model_name": pcfg.model_name, "challenger": version, "decision": decision, "readout": sentence}
    decided = registry.version_tags(pcfg, version).get(INTERLEAVING_TAG, "")
    if aliases.get("champion") == version or decided.startswith("retired"):  # an interrupted move
        if aliases.get("champion") == version and not decided.startswith("promoted"):
            registry.set_version_tags(pcfg, version, {INTERLEAVING_TAG: f"promoted: {sentence}",
                                                      "clickclip.decision": "promoted"})
        _drop_challenger(cfg)
        return outcome | {"decision": "promote" if aliases.get("champion") == version else "retire",
                          "changed": True, "note": "finished an interrupted decision",
                          "champion": registry.champion_version(pcfg)}
    if decision == "continue":
        return outcome | {"changed": False}
    if decision == "promote":
        table = current[1] if current else registry.version_tags(pcfg, version).get(INDEX_TAG)
        note = make_champion(cfg, version, table, champion)
        registry.set_version_tags(pcfg, version, {INTERLEAVING_TAG: f"promoted: {sentence}",
                                                  "clickclip.decision": "promoted"})
        outcome["note"] = note.removeprefix("; ")
    else:
        registry.set_version_tags(pcfg, version, {INTERLEAVING_TAG: f"retired: {sentence}"})
    reached("tagged")
    _drop_challenger(cfg)
    return outcome | {"changed": True, "champion": registry.champion_version(pcfg)}
