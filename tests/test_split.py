import json

import numpy as np
import polars as pl
import pytest

from pipeline.config import SplitFractions
from pipeline.errors import LeakError
from pipeline.extract import extract
from pipeline.split import (
    connected_groups,
    leak_audit,
    near_duplicate_pairs,
    same_product_pairs,
    split,
    stable_split,
)


def _brute_force(hashes: list[str], t: int) -> set[tuple[int, int]]:
    ints = [int(h, 16) for h in hashes]
    return {(i, j) for i in range(len(ints)) for j in range(i + 1, len(ints))
            if bin(ints[i] ^ ints[j]).count("1") <= t}


@pytest.mark.parametrize("t", [0, 3, 8, 12])
def test_near_duplicate_pairs_equal_brute_force(t):
    rng = np.random.default_rng(t)
    base = rng.integers(0, 2**63, size=300, dtype=np.int64).astype(np.uint64)
    # plant neighbours at known distances so every t has pairs to find
    flips = [base[i] ^ np.uint64((1 << int(rng.integers(0, 64))) | (1 << int(rng.integers(0, 64))))
             for i in range(100)]
    hashes = [f"{int(v):016x}" for v in np.concatenate([base, flips])]
    got = {tuple(p) for p in near_duplicate_pairs(hashes, t).tolist()}
    assert got == _brute_force(hashes, t)


def test_groups_union_hash_and_product_edges():
    edges = np.concatenate([np.array([[0, 1]]), same_product_pairs(["p", None, "q", "p", "q"])])
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
                           "product_id": ["p", "q", "q"], "split": ["train", "test", "val"]})
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
    import pipeline.split as split_module

    pairs = _extracted_pairs(tiny_config, tmp_path)
    monkeypatch.setattr(split_module, "stable_split", lambda key, salt, fr: "test" if key[-1] in "02468" else "train")
    monkeypatch.setattr(split_module, "same_product_pairs", lambda ids: np.zeros((0, 2), dtype=np.int64))
    with pytest.raises(LeakError, match="leak audit failed"):
        split(tiny_config, pairs, tmp_path / "split")
