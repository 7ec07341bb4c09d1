"""Mined hard negatives are never known positives; WiSE-FT interpolation; buddy packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.training.hard_negatives import buddy_pairs, excluded_images, mine_hard_negatives
from pipeline.training.samplers import unique_batches, with_buddies


@pytest.mark.parametrize("seed", range(5))
def test_no_mined_negative_is_a_known_positive_or_its_product_or_group(seed):
    rng = np.random.default_rng(seed)
    images = [f"i{j}" for j in range(60)]
    product = {image: f"p{rng.integers(20)}" for image in images}
    group = {image: f"g{rng.integers(40)}" for image in images}
    same = {image: {o for o in images if product[o] == product[image] or group[o] == group[image]}
            for image in images}
    queries = [f"q{j}" for j in range(25)]
    known = {q: set(rng.choice(images, int(rng.integers(1, 6)), replace=False).tolist()) for q in queries}
    # queries sit right next to their positives, so the nearest images are the traps
    image_vectors = rng.normal(size=(60, 16)).astype(np.float32)
    query_vectors = np.stack([image_vectors[[images.index(i) for i in known[q]]].mean(0) for q in queries])
    mined = mine_hard_negatives(query_vectors, image_vectors, queries, images, known, same, per_query=5, pool=30)
    assert any(mined.values())
    for q, negatives in mined.items():
        positives = known[q]
        for image in negatives:
            assert image not in positives
            assert all(product[image] != product[p] and group[image] != group[p] for p in positives)
        assert len(negatives) <= 5
    assert excluded_images("unknown", known, same) == set()


def test_buddies_are_packed_next_to_their_anchor_and_every_pair_comes_once():
    queries = [f"q{j}" for j in range(40)]
    images = [f"i{j}" for j in range(40)]
    negatives = {f"q{j}": [f"i{(j + 7) % 40}"] for j in range(40)}
    buddies = buddy_pairs(queries, images, negatives)
    assert buddies[0] == [7]
    order = with_buddies(list(range(40)), buddies, seed=0)
    assert sorted(order) == list(range(40))
    batches = unique_batches(queries, images, [None] * 40, 8, seed=0, buddies=buddies)
    together = sum(1 for batch in batches for i in batch if (i + 7) % 40 in batch)
    assert together >= 10  # without buddies two given pairs share a batch of 8 from 40 about 18% of the time


def test_wise_ft_interpolation():
    from pipeline.stages.train import interpolate

    start = {"w": torch.zeros(3), "steps": torch.tensor([1])}
    trained = {"w": torch.ones(3) * 2, "steps": torch.tensor([5])}
    assert torch.equal(interpolate(start, trained, 0.0)["w"], start["w"])
    assert torch.equal(interpolate(start, trained, 1.0)["w"], trained["w"])
    assert torch.allclose(interpolate(start, trained, 0.25)["w"], torch.full((3,), 0.5))
    assert interpolate(start, trained, 0.5)["steps"].item() == 5  # integer buffers are not averaged
