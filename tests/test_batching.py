import numpy as np

from pipeline.training.samplers import UniqueBatchSampler, unique_batches


def _clicky_log(n: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    # heavy repetition, as in click logs: few head queries, popular images, multi-photo products
    queries = [f"q{int(q)}" for q in rng.zipf(1.3, n) % 300]
    images = [f"i{int(i)}" for i in rng.zipf(1.2, n) % 800]
    products = [None if i.endswith("7") else f"p{int(i[1:]) // 3}" for i in images]
    return queries, images, products


def test_no_query_image_or_product_repeats_within_a_batch():
    queries, images, products = _clicky_log()
    batches = unique_batches(queries, images, products, batch_size=32, seed=1)
    assert batches
    seen = set()
    for batch in batches:
        assert len(batch) == 32
        for field in (queries, images):
            assert len({field[i] for i in batch}) == 32
        batch_products = [products[i] for i in batch if products[i] is not None]
        assert len(set(batch_products)) == len(batch_products)
        assert not seen & set(batch)
        seen |= set(batch)


def test_a_plain_shuffle_would_have_repeated_them():
    queries, _, _ = _clicky_log()
    order = np.random.default_rng(1).permutation(len(queries))
    clashes = sum(len({queries[i] for i in order[s:s + 32]}) < 32 for s in range(0, len(order) - 31, 32))
    assert clashes > 0


def test_sampler_reshuffles_each_epoch_with_a_fixed_length():
    queries, images, products = _clicky_log()
    sampler = UniqueBatchSampler(queries, images, products, batch_size=16, seed=3)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(second) == len(sampler) > 0
    assert first != second
    assert list(UniqueBatchSampler(queries, images, products, 16, seed=3)) == first


def test_start_at_epoch_replays_an_epoch():
    queries, images, products = _clicky_log()
    sampler = UniqueBatchSampler(queries, images, products, batch_size=16, seed=3)
    epochs = [list(sampler) for _ in range(3)]
    resumed = UniqueBatchSampler(queries, images, products, batch_size=16, seed=3)
    resumed.start_at_epoch(2)
    assert list(resumed) == epochs[2]

