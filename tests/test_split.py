import json
import shutil

import numpy as np
import polars as pl
import pytest

from pipeline.config import SplitConfig, SplitFractions
from pipeline.data.groups import assign_sticky_splits, connected_groups, same_key_pairs, stable_split
from pipeline.data.leak_audit import leak_audit
from pipeline.data.near_duplicates import near_duplicate_pairs
from pipeline.demo.images import draw_look, render_photo
from pipeline.errors import LeakError
from pipeline.stages.extract import extract
from pipeline.stages.split import split
from tests.conftest import shop_config


def _brute_force(hashes: list[str], t: int) -> set[tuple[int, int]]:
    codes = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    pairs = set()
    for i in range(len(codes) - 1):
        distance = np.bitwise_count(codes[i + 1:] ^ codes[i])
        pairs.update((i, i + 1 + int(j)) for j in np.flatnonzero(distance <= t))
    return pairs


def _hashes_with_planted_neighbours(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64)
    planted = []
    for i in range(n // 4):  # neighbours at every distance up to 12
        flips = rng.choice(64, size=int(rng.integers(0, 13)), replace=False)
        planted.append(base[i] ^ np.uint64(sum(1 << int(b) for b in flips)))
    return [f"{int(v):016x}" for v in np.concatenate([base, planted])]


@pytest.mark.parametrize("t", [0, 3, 8, 12])
def test_near_duplicate_pairs_equal_brute_force(t):
    hashes = _hashes_with_planted_neighbours(400, seed=t)
    got = {tuple(p) for p in near_duplicate_pairs(hashes, t, method="flat").tolist()}
    assert got == _brute_force(hashes, t)


@pytest.mark.parametrize("t", [2, 6, 8])
def test_multi_index_hashing_is_exact_on_20000_hashes(t):
    hashes = _hashes_with_planted_neighbours(16_000, seed=100 + t)  # 16,000 + 4,000 planted
    assert len(hashes) == 20_000
    got = {tuple(p) for p in near_duplicate_pairs(hashes, t, method="multihash").tolist()}
    expected = _brute_force(hashes, t)
    assert len(expected) > 500
    assert got == expected


def _planted_codes(n: int, bits: int, t: int, seed: int) -> np.ndarray:
    """n random codes, then n // 4 copies of some with 0 to t + 2 bits flipped."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    planted = codes[rng.integers(0, n, n // 4)].copy()
    for row in planted:
        for bit in rng.choice(bits, int(rng.integers(0, t + 3)), replace=False):
            row[bit // 8] ^= np.uint8(1 << (bit % 8))
    return np.concatenate([codes, planted])


def test_multi_index_hashing_is_exact_on_the_shipped_hash_and_distance():
    import faiss

    from pipeline.config import SplitConfig

    cfg = SplitConfig()
    bits, t = cfg.hash_size**2, cfg.max_distance
    codes = _planted_codes(16_000, bits, t, seed=7)
    got = {tuple(p) for p in near_duplicate_pairs([c.tobytes().hex() for c in codes], t, method="multihash")
           .tolist()}
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(codes)
    lims, _, neighbours = flat.range_search(codes, t + 1)
    expected = {(i, int(j)) for i in range(len(codes)) for j in neighbours[lims[i]:lims[i + 1]] if i < j}
    assert len(expected) > 2000
    assert got == expected


def test_the_leak_audit_at_catalog_scale_finds_what_a_flat_scan_finds(monkeypatch):
    import pipeline.data.leak_audit as audit_module

    codes = _planted_codes(8_000, 256, 24, seed=3)
    rng = np.random.default_rng(0)
    images = pl.DataFrame({"image_id": [f"i{j}" for j in range(len(codes))],
                           "hash": [c.tobytes().hex() for c in codes], "digest": [f"d{j}" for j in range(len(codes))],
                           "product_id": [None] * len(codes),
                           "split": rng.choice(["train", "train", "train", "val", "test"], len(codes)).tolist()})
    flat = audit_module.leak_audit(images, max_distance=24)
    monkeypatch.setattr(audit_module, "FLAT_AUDIT_LIMIT", 100)  # the multi-hash path
    hashed = audit_module.leak_audit(images, max_distance=24)
    assert flat["near_duplicate_links_crossing"] > 100
    assert hashed == flat


def test_groups_union_hash_and_product_edges():
    edges = np.concatenate([np.array([[0, 1]]), same_key_pairs(["p", None, "q", "p", "q"])])
    labels = connected_groups(5, edges)
    assert labels[0] == labels[1] == labels[3]
    assert labels[2] == labels[4] != labels[0]


def test_stable_split_is_deterministic_and_follows_fractions():
    fractions = SplitFractions(train=0.6, val=0.2, test=0.2)
    first = [stable_split(f"g{i}", "salt", fractions) for i in range(5000)]
    assert first == [stable_split(f"g{i}", "salt", fractions) for i in range(5000)]
    shares = {s: first.count(s) / len(first) for s in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.6, abs=0.03)
    assert shares["test"] == pytest.approx(0.2, abs=0.03)
    assert first != [stable_split(f"g{i}", "other salt", fractions) for i in range(5000)]


def test_leak_audit_catches_a_crossing_group():
    images = pl.DataFrame({"image_id": ["a", "b", "c"], "hash": ["0" * 16, "0" * 15 + "1", "f" * 16],
                           "digest": ["d1", "d2", "d3"], "product_id": ["p", "q", "q"],
                           "split": ["train", "test", "val"]})
    audit = leak_audit(images, max_distance=2)
    assert not audit["passed"]
    assert audit["near_duplicate_links_crossing"] == 1
    assert audit["products_crossing"] == 1


def _extracted_pairs(cfg, tmp_path):
    (tmp_path / "extract").mkdir()
    (tmp_path / "split").mkdir()
    return extract(cfg, tmp_path / "extract").pairs


def test_demo_split_is_leak_free_and_finds_planted_duplicates(tiny_config, tiny_shop, tmp_path):
    pairs = _extracted_pairs(tiny_config, tmp_path)
    result = split(tiny_config, pairs, tmp_path / "split")
    images = pl.read_parquet(result.images)
    # no group and no product straddles splits
    assert images.group_by("group_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert images.drop_nulls("product_id").group_by("product_id").agg(
        pl.col("split").n_unique())["split"].max() == 1
    assert json.loads(result.leak_audit.read_text())["passed"]
    # planted near-duplicates land in the same group as their original
    dups = pl.read_parquet(tiny_shop / "truth" / "duplicates.parquet")
    group = dict(zip(images["image_id"], images["group_id"], strict=True))
    found = [group.get(a) == group.get(b) for a, b in dups.iter_rows() if a in group and b in group]
    assert found and sum(found) / len(found) >= 0.95
    # the broken catalog files are quarantined with their reason; nothing is lost
    quarantine = pl.read_parquet(result.image_quarantine)
    assert sorted(quarantine["reason"].to_list()) == ["missing_file", "not_an_image"]
    assert images.height + quarantine.height == result.summary["catalog_rows"]
    tagged, excluded = pl.read_parquet(result.pairs), pl.read_parquet(result.pairs_excluded)
    assert tagged.height + excluded.height == pl.read_parquet(pairs).height


def test_leak_error_when_audit_fails(tiny_config, tmp_path, monkeypatch):
    import pipeline.data.groups as split_module

    pairs = _extracted_pairs(tiny_config, tmp_path)
    monkeypatch.setattr(split_module, "stable_split", lambda key, salt, fr: "test" if key[-1] in "02468" else "train")
    monkeypatch.setattr(split_module, "same_key_pairs", lambda ids: np.zeros((0, 2), dtype=np.int64))
    with pytest.raises(LeakError, match="leak audit failed"):
        split(tiny_config, pairs, tmp_path / "split")


def test_assign_sticky_splits_keeps_old_and_applies_link_policy():
    ids = ["a", "b", "c", "d", "e", "f"]
    labels = np.array([0, 0, 0, 1, 1, 2])  # c links a (train) with b (test); e joins d; f is new
    registry = {"a": "train", "b": "test", "d": "val"}
    splits, stats = assign_sticky_splits(ids, labels, registry, SplitConfig())
    # a and b keep their registered splits in the registry; b, registered into the later split on the
    # same day, and c, which linked them, sit out training and evaluation (no leak, no LeakError)
    assert splits[:5] == ["train", "excluded", "excluded", "val", "val"]
    assert splits[5] == stable_split("f", SplitConfig().salt, SplitConfig().fractions)
    assert stats == {"new_groups": 1, "grown_groups": 1, "linked_groups": 1, "images_excluded": 2}
    # the side registered first keeps its images
    first_test, _ = assign_sticky_splits(ids, labels, registry, SplitConfig(),
                                         {"a": "2026-11-02T00:00:00Z", "b": "2026-11-01T00:00:00Z"})
    assert first_test[:3] == ["excluded", "test", "excluded"]
    strict, _ = assign_sticky_splits(ids, labels, registry, SplitConfig(link_policy="exclude_group"))
    assert strict[:3] == ["excluded"] * 3


def test_a_chain_of_look_alike_products_does_not_become_one_giant_group():
    from pipeline.data.groups import catalog_groups, exclude_crossing_links

    # 300 products, one photo each; each hash differs from the next in 4 bits: a chain through all of them
    bits = np.zeros((300, 256), dtype=np.uint8)
    for i in range(1, 300):
        bits[i] = bits[i - 1]
        bits[i, (4 * i) % 256:(4 * i) % 256 + 4] ^= 1
    hashes = [np.packbits(row).tobytes().hex() for row in bits]
    products = [f"p{i}" for i in range(300)]
    digests = [f"d{i}" for i in range(300)]
    chained, edges, _ = catalog_groups(hashes, digests, products, max_distance=6)
    assert np.bincount(chained).max() == 300  # plain transitive merging: one group of every product
    labels, edges, cut = catalog_groups(hashes, digests, products, max_distance=6, giant_size=100)
    assert np.bincount(labels).max() == 1 and len(cut) == len(edges)  # regrouped by product
    # a second photo of a product stays with it, near-duplicate or not
    labels, _, _ = catalog_groups(hashes + [hashes[7]], digests + ["d7b"], products + ["p7"], 6, giant_size=100)
    assert labels[300] == labels[7]
    # cut links that straddle splits keep their later side out of training and evaluation
    splits = [["train", "val", "test"][i % 3] for i in range(300)]
    excluded = exclude_crossing_links(splits, cut)
    assert excluded > 0
    for i, j in cut.tolist():
        assert "excluded" in (splits[i], splits[j]) or splits[i] == splits[j]


def test_changed_hash_settings_need_the_migration_command(tiny_shop, tmp_path):
    from pipeline.errors import StageError
    from pipeline.stages.split import migrate_registry
    from tests.conftest import shop_config

    cfg = shop_config(tiny_shop, tmp_path)
    pairs = _extracted_pairs(cfg, tmp_path)
    for name in ("split1", "split2", "split3"):
        (tmp_path / name).mkdir()
    split(cfg, pairs, tmp_path / "split1")
    before = pl.read_parquet(cfg.state_dir / cfg.name / "split_registry.parquet")
    changed = cfg.model_copy(update={"split": cfg.split.model_copy(update={"max_distance": 30})})
    with pytest.raises(StageError, match=r"split.max_distance 24 -> 30.*migrate-split-registry"):
        split(changed, pairs, tmp_path / "split2")
    assert migrate_registry(changed)["settings_now"]["max_distance"] == 30
    split(changed, pairs, tmp_path / "split3")
    after = pl.read_parquet(cfg.state_dir / cfg.name / "split_registry.parquet")
    kept = before.join(after, on="image_id", suffix="_after")
    assert kept.height == before.height and (kept["split"] == kept["split_after"]).all()


def test_rerun_with_new_images_keeps_assignments_and_hashes_only_new_files(tiny_shop, tmp_path):
    shop = tmp_path / "shop"
    shutil.copytree(tiny_shop, shop)
    cfg = shop_config(shop, tmp_path / "work")
    pairs = _extracted_pairs(cfg, tmp_path)
    first = split(cfg, pairs, tmp_path / "split")
    before = pl.read_parquet(first.images).select("image_id", "split")
    assert first.summary["hash_cache"]["hashed"] == before.height + 1  # + the planted not-an-image file

    catalog = pl.read_parquet(shop / "images.parquet")
    rng = np.random.default_rng(7)
    copies = catalog.filter(pl.col("image_id").is_in(before["image_id"].head(2).to_list()))
    new_rows = [{"image_id": f"COPY{i}", "path": f"COPY{i}.png", "product_id": f"NEW{i}", "title": None,
                 "category": row["category"]} for i, row in enumerate(copies.iter_rows(named=True))]
    for i, row in enumerate(copies.iter_rows(named=True)):
        shutil.copyfile(shop / "images" / row["path"], shop / "images" / f"COPY{i}.png")
    for i in range(3):
        look = draw_look(rng, "mug", "red", "dotted")
        render_photo(look, rng).save(shop / "images" / f"NEWIMG{i}.png")
        new_rows.append({"image_id": f"NEWIMG{i}", "path": f"NEWIMG{i}.png", "product_id": f"NEWP{i}",
                         "title": "new mug", "category": "mug"})
    pl.concat([catalog, pl.DataFrame(new_rows, schema=catalog.schema)]).write_parquet(shop / "images.parquet")

    (tmp_path / "split2").mkdir()
    second = split(cfg, pairs, tmp_path / "split2")
    after = pl.read_parquet(second.images).select("image_id", "split")
    joined = before.join(after, on="image_id", suffix="_after")
    assert joined.height == before.height
    assert (joined["split"] == joined["split_after"]).all()
    assert second.summary["hash_cache"]["hashed"] == 3  # the byte-identical copies come from the cache
    # only the 5 new files were read: the others' digests are keyed by path, size and mtime
    assert second.summary["hash_cache"]["read"] == 5
    split_of = dict(after.iter_rows())
    for i, row in enumerate(copies.iter_rows(named=True)):
        assert split_of[f"COPY{i}"] == split_of[row["image_id"]]


def test_an_image_root_that_is_wrong_stops_split_naming_the_setting(tiny_config, tmp_path):
    from pipeline.errors import DataContractError

    pairs = _extracted_pairs(tiny_config, tmp_path)
    nowhere = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(
        update={"image_root": tmp_path / "no-such-folder"})})
    with pytest.raises(DataContractError, match=r"data.image_root .*no-such-folder is not a folder"):
        split(nowhere, pairs, tmp_path / "split")
    (tmp_path / "empty").mkdir()
    elsewhere = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(
        update={"image_root": tmp_path / "empty"})})
    with pytest.raises(DataContractError, match=r"none of the \d+ catalog paths exists under data.image_root"):
        split(elsewhere, pairs, tmp_path / "split")


def test_earlier_runs_registrations_are_the_sticky_held_out_set_but_a_retried_runs_own_are_not(tiny_shop, tmp_path):
    """Regression: a split killed after writing the registry, then retried, marked every image as
    registered by an earlier run (the retry read its own registrations), so its images.parquet
    differed from an uninterrupted run's."""
    cfg = shop_config(tiny_shop, tmp_path / "work")
    pairs = _extracted_pairs(cfg, tmp_path)
    (tmp_path / "a").mkdir()
    first = pl.read_parquet(split(cfg, pairs, tmp_path / "a", run_id="week-1").images)
    assert not first["registered_earlier"].any()
    (tmp_path / "b").mkdir()
    retried = pl.read_parquet(split(cfg, pairs, tmp_path / "b", run_id="week-1").images)
    assert retried.equals(first)
    (tmp_path / "c").mkdir()
    next_week = pl.read_parquet(split(cfg, pairs, tmp_path / "c", run_id="week-2").images)
    assert next_week["registered_earlier"].all()


def test_a_run_that_adopts_a_split_sees_its_images_as_held_out_earlier(tiny_shop, tmp_path):
    """Regression: week 2 adopted week 1's split folder (same inputs), whose images.parquet says
    nothing was registered earlier, and the earlier-held-out gate compared 0 queries. The run's own
    view comes from the registry: what runs other than itself registered."""
    from pipeline.data.split_registry import registered_before

    cfg = shop_config(tiny_shop, tmp_path / "work")
    (tmp_path / "a").mkdir()
    adopted = pl.read_parquet(split(cfg, _extracted_pairs(cfg, tmp_path), tmp_path / "a", run_id="week-1").images)
    assert not adopted["registered_earlier"].any()  # week 1's own view, which week 2 adopts unchanged
    registry = cfg.state_dir / cfg.name / "split_registry.parquet"
    kept = set(adopted["image_id"].to_list())
    assert registered_before(registry, "week-2") == kept
    assert registered_before(registry, "week-1") == set()


def test_an_unchanged_catalog_is_not_read_again_and_a_rewritten_file_is(tiny_shop, tmp_path):
    from pipeline.config import SplitConfig
    from pipeline.data.near_duplicates import hash_catalog

    root = tmp_path / "images"
    shutil.copytree(tiny_shop / "images", root)
    paths = sorted(p.name for p in root.iterdir())[:20]
    caches = (tmp_path / "hashes.parquet", tmp_path / "digests.parquet")
    first, stats = hash_catalog(paths, root, SplitConfig(), *caches)
    assert stats["read"] == 20
    again, stats = hash_catalog(paths, root, SplitConfig(), *caches)
    assert (stats["read"], stats["hashed"]) == (0, 0) and again.equals(first)
    # the same name, new content (and so a new size or modification time): read and hashed again
    shutil.copyfile(root / paths[1], root / paths[0])
    changed, stats = hash_catalog(paths, root, SplitConfig(), *caches)
    assert stats["read"] == 1 and changed["digest"][0] == first["digest"][1]


def test_draft_decoding_of_large_jpegs_keeps_hashes_close_to_a_full_decode(tmp_path):
    """The shipped hash on 800x800 photos: draft (1/8-scale DCT decode) against every pixel decoded.
    bench_split.py measures what the difference does to near-duplicate recall."""
    from pipeline.config import SplitConfig
    from pipeline.data.near_duplicates import hash_catalog

    rng = np.random.default_rng(0)
    for i in range(12):
        render_photo(draw_look(rng, "dress", "red", "striped"), rng).resize((800, 800)).save(
            tmp_path / f"p{i}.jpg", quality=90)
    paths = [f"p{i}.jpg" for i in range(12)]
    draft, _ = hash_catalog(paths, tmp_path, SplitConfig(decode="draft"), tmp_path / "h.parquet")
    full, _ = hash_catalog(paths, tmp_path, SplitConfig(decode="full"), tmp_path / "h.parquet")
    distances = [bin(int(a, 16) ^ int(b, 16)).count("1") for a, b in zip(draft["hash"], full["hash"], strict=True)]
    assert max(distances) <= SplitConfig().max_distance // 3, distances
    cached = pl.read_parquet(tmp_path / "h.parquet")
    assert sorted(cached["method"].unique()) == ["phash", "phash+draft"]  # kept apart in the cache
