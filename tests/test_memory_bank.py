import pytest
import torch
from open_clip.loss import ClipLoss

from pipeline.training.memory_bank import NO_KEY, MemoryBank, key_ids, memory_bank_loss


def _unit(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _keys(images, products, queries) -> torch.Tensor:
    return torch.stack([key_ids(images), key_ids(products), key_ids(queries)], dim=1)


def test_key_ids_are_stable_and_missing_keys_match_nothing():
    assert key_ids(["a", "b", "a"]).tolist()[0] == key_ids(["a"]).item()
    assert key_ids([None, ""]).tolist() == [NO_KEY, NO_KEY]
    assert (key_ids(["x", "y"]) >= 0).all()


def test_queue_wraps_around_and_keeps_the_newest_entries():
    bank = MemoryBank(size=5, dim=8)
    first, second = _unit(3, seed=1), _unit(4, seed=2)
    bank.enqueue(first, first, _keys(["a", "b", "c"], [None] * 3, ["q1", "q2", "q3"]))
    assert bank.filled.item() == 3 and bank.pointer.item() == 3
    bank.enqueue(second, second, _keys(["d", "e", "f", "g"], [None] * 4, ["q4", "q5", "q6", "q7"]))
    assert bank.filled.item() == 5 and bank.pointer.item() == 2
    # slots 3, 4, 0, 1 hold d..g; slot 2 still holds c, the oldest survivor
    torch.testing.assert_close(bank.images[[3, 4, 0, 1]], second)
    torch.testing.assert_close(bank.images[2], first[2])
    # a batch larger than the memory keeps only its newest rows
    big = _unit(7, seed=3)
    bank.enqueue(big, big, _keys(list("hijklmn"), [None] * 7, list("HIJKLMN")))
    assert sorted(bank.keys[:, 0].tolist()) == sorted(key_ids(list("jklmn")).tolist())


def test_entries_sharing_image_product_or_query_are_not_negatives():
    bank = MemoryBank(size=6, dim=8)
    feats = _unit(4, seed=4)
    bank.enqueue(feats, feats, _keys(["img1", "img2", "img3", "img4"], ["p1", None, "p3", None],
                                     ["red mug", "blue mug", "green mug", "navy trainers"]))
    batch = _keys(["img1", "img9", "img8"], ["p7", "p3", None], ["white mug", "pink mug", "navy trainers"])
    usable = bank.usable(batch)
    assert usable.tolist() == [
        [False, True, True, True, False, False],   # same image as entry 0; slots 4-5 are empty
        [True, True, False, True, False, False],   # same product as entry 2
        [True, True, True, False, False, False],   # same query as entry 3; missing products match nothing
    ]


def test_loss_with_an_empty_bank_is_clip_loss_and_masked_entries_do_not_count():
    image, text, scale = _unit(6, seed=5), _unit(6, seed=6), torch.tensor(10.0)
    keys = _keys([f"i{n}" for n in range(6)], ["one product"] * 6, [f"q{n}" for n in range(6)])
    bank = MemoryBank(size=8, dim=8)
    assert memory_bank_loss(image, text, scale, bank, keys).item() == pytest.approx(
        ClipLoss()(image, text, scale).item(), rel=1e-6)
    # a memory of photos of the rows' own product is masked away entirely
    bank.enqueue(image, text, keys)
    assert memory_bank_loss(image, text, scale, bank, keys).item() == pytest.approx(
        ClipLoss()(image, text, scale).item(), rel=1e-6)
    # the same embeddings under other keys are hard negatives: the loss rises
    bank.enqueue(image, text, _keys([f"x{n}" for n in range(6)], [None] * 6, [f"y{n}" for n in range(6)]))
    assert memory_bank_loss(image, text, scale, bank, keys).item() > ClipLoss()(image, text, scale).item() + 0.1


def test_gradients_flow_to_the_batch_and_not_into_the_memory():
    image, text = _unit(4, seed=7).requires_grad_(), _unit(4, seed=8).requires_grad_()
    bank = MemoryBank(size=4, dim=8)
    bank.enqueue(_unit(4, seed=9), _unit(4, seed=10), _keys(list("abcd"), [None] * 4, list("ABCD")))
    memory_bank_loss(image, text, torch.tensor(5.0), bank, _keys(list("efgh"), [None] * 4, list("EFGH"))).backward()
    assert image.grad is not None and text.grad is not None
    assert not bank.images.requires_grad
