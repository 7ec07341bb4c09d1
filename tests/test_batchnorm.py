"""BatchNorm towers (the demo's ClickCLIP-TinyRN) under each way of finding negatives: grad cache is
exact with frozen BatchNorm and refused without it; the memory bank's step is the in-batch step."""

import pytest
import torch
from open_clip.loss import ClipLoss

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.training.grad_cache import grad_cache_backward
from pipeline.training.model import batchnorm_layers, freeze_batchnorm, starting_model
from pipeline.training.negatives import build_negatives

RN = "ClickCLIP-TinyRN"


def _batch(bundle, n: int = 16):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 64, 64, generator=generator, dtype=torch.float64)
    tokens = bundle.tokenizer([f"query number {i} red mug" for i in range(n)])
    return images, tokens


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _running(model):
    return {name: b.clone() for name, b in model.named_buffers() if "running" in name or "num_batches" in name}


def _full_batch(model, images, tokens, loss_fn):
    model.zero_grad()
    loss = loss_fn(model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True),
                   model.logit_scale.exp())
    loss.backward()
    return loss.detach(), _grads(model)


def test_grad_cache_is_refused_for_batchnorm_naming_the_layers_and_the_way_out():
    cfg = TrainConfig(model=RN, negatives="grad_cache", micro_batch_size=4, batch_size=16)
    model = starting_model(cfg).model
    assert batchnorm_layers(model)[:2] == ["visual.bn1", "visual.bn2"]
    with pytest.raises(ConfigError) as refused:
        build_negatives(cfg, 64, model)
    message = str(refused.value)
    assert "BatchNorm layers (visual.bn1, visual.bn2" in message and "in all)" in message
    assert "micro-batch of 4" in message and "batch of 16" in message
    assert "train.batchnorm: frozen" in message and "'in_batch'" in message
    # frozen BatchNorm, or a model without BatchNorm, is accepted
    build_negatives(cfg.model_copy(update={"batchnorm": "frozen"}), 64, model)
    vit = TrainConfig(negatives="grad_cache", micro_batch_size=4)
    assert batchnorm_layers(starting_model(vit).model) == []
    build_negatives(vit, 64, starting_model(vit).model)


def test_grad_cache_with_train_mode_batchnorm_is_not_the_big_batch():
    """Why the refusal: per-micro-batch statistics give another loss and other gradients."""
    bundle = starting_model(TrainConfig(model=RN, seed=0))
    model = bundle.model.double().train()
    images, tokens = _batch(bundle)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    big_loss, expected = _full_batch(model, images, tokens, ClipLoss())
    model.load_state_dict(start)
    model.zero_grad()
    cached = grad_cache_backward(model, images, tokens, micro_batch=4, loss_fn=ClipLoss())
    assert abs(cached.item() - big_loss.item()) > 1e-3
    got = _grads(model)
    assert max((got[n] - expected[n]).abs().max() / expected[n].abs().max().clamp_min(1e-12) for n in expected) > 0.01


def test_grad_cache_with_frozen_batchnorm_equals_the_big_batch_and_keeps_running_statistics():
    bundle = starting_model(TrainConfig(model=RN, seed=0))
    model = bundle.model.double().train()
    freeze_batchnorm(model)
    images, tokens = _batch(bundle)
    before = _running(model)
    big_loss, expected = _full_batch(model, images, tokens, ClipLoss())
    model.zero_grad()
    cached = grad_cache_backward(model, images, tokens, micro_batch=4, loss_fn=ClipLoss())
    got = _grads(model)
    assert cached.item() == pytest.approx(big_loss.item(), rel=1e-10)
    assert got.keys() == expected.keys() and any(name.startswith("visual.bn1") for name in got)  # BN's affine learns
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-7, atol=1e-10, msg=name)
    for name, value in _running(model).items():
        assert torch.equal(value, before[name]), name


class _Module:
    """What MemoryBankNegatives.step and InBatchNegatives.step use of the Lightning module."""

    def __init__(self, model, global_step: int):
        self.model, self.global_step, self.device = model, global_step, torch.device("cpu")

    def embed(self, images, tokens):
        return self.model.encode_image(images, normalize=True), self.model.encode_text(tokens, normalize=True)


def test_the_memory_bank_step_with_batchnorm_is_the_in_batch_step_until_the_memory_fills():
    """MemoryBankNegatives embeds the whole batch in one forward pass, as in-batch training does:
    the same batch statistics, one running-statistics update, and before its warm-up ends the same
    loss and gradients; after it, the memory's entries (constants) add negatives: a larger loss."""
    from pipeline.training.losses import WeightedClipLoss
    from pipeline.training.negatives import InBatchNegatives, MemoryBankNegatives

    bundle = starting_model(TrainConfig(model=RN, seed=0))
    model = bundle.model.double().train()
    images, tokens = _batch(bundle, 8)
    texts = [f"q{i}" for i in range(8)]
    batch = [images, texts, [f"i{i}" for i in range(8)], [None] * 8, torch.ones(8), tokens]
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def step(negatives, global_step):
        model.load_state_dict(start)
        model.zero_grad()
        loss = negatives.step(_Module(model, global_step), batch, WeightedClipLoss(), None)
        loss.backward()
        return loss.detach(), _grads(model), _running(model)

    in_batch = step(InBatchNegatives(), 0)
    assert any(not torch.equal(in_batch[2][n], start[n]) for n in in_batch[2] if "running_mean" in n)
    bank = MemoryBankNegatives(16, 64, warmup_steps=1)
    bank.bank.double()
    warming = step(bank, 0)  # before the warm-up ends: the in-batch loss (and the batch is enqueued)
    assert warming[0].item() == pytest.approx(in_batch[0].item(), rel=1e-10)
    for name in in_batch[1]:
        torch.testing.assert_close(warming[1][name], in_batch[1][name], rtol=1e-7, atol=1e-10, msg=name)
    for name in in_batch[2]:
        assert torch.equal(warming[2][name], in_batch[2][name]), name
    batch[1] = [f"other {i}" for i in range(8)]  # other queries and images: the memory's entries are negatives
    batch[2] = [f"j{i}" for i in range(8)]
    in_batch_other = step(InBatchNegatives(), 1)
    filled = step(bank, 1)
    for name in in_batch_other[2]:
        assert torch.equal(filled[2][name], in_batch_other[2][name]), name
    assert filled[0].item() > in_batch_other[0].item()


class _Pairs(torch.utils.data.Dataset):
    """Items shaped like PairDataset's: uint8 images, a query, ids and a weight."""

    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(2)
        self.images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], f"query {i % 7} red mug", f"i{i}", f"p{i}", 1.0


def _fit(cfg: TrainConfig, hard_negative_mining: bool = False):
    """A few steps of the real Lightning module under the Trainer train() builds; the model's
    BatchNorm buffers and parameters before and after."""
    from pipeline.stages.train import build_trainer
    from pipeline.training.datasets import TokenizingCollate
    from pipeline.training.finetuner import ClipFineTuner

    bundle = starting_model(cfg)
    if hard_negative_mining:
        bundle.model.eval()  # what embedding the catalog to mine hard negatives leaves behind
    before = {**_running(bundle.model), **{n: p.detach().clone() for n, p in bundle.model.named_parameters()}}
    loader = torch.utils.data.DataLoader(_Pairs(3 * cfg.batch_size), batch_size=cfg.batch_size,
                                         collate_fn=TokenizingCollate(bundle.tokenizer))
    trainer = build_trainer(cfg, False, [], max_steps=3, accelerator="cpu", enable_checkpointing=False,
                            enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(ClipFineTuner(bundle, cfg), loader)
    return before, {**_running(bundle.model), **{n: p.detach() for n, p in bundle.model.named_parameters()}}


def test_training_through_lightning_keeps_frozen_batchnorm_frozen_and_trains_train_mode_batchnorm():
    """Lightning never calls the module's train(): the fine-tuner sets the modes itself at every
    epoch's start, so frozen BatchNorm keeps its running statistics (its scale and shift learn),
    and train-mode BatchNorm updates them, even after hard-negative mining left the model in eval."""
    frozen = TrainConfig(model=RN, negatives="grad_cache", batchnorm="frozen", batch_size=8, micro_batch_size=4,
                         warmup_steps=1)
    before, after = _fit(frozen)
    assert all(torch.equal(before[n], after[n]) for n in before if "running" in n)
    assert not torch.equal(before["visual.bn1.weight"], after["visual.bn1.weight"])
    plain = TrainConfig(model=RN, batch_size=8, warmup_steps=1)
    before, after = _fit(plain, hard_negative_mining=True)
    assert not torch.equal(before["visual.bn1.running_mean"], after["visual.bn1.running_mean"])
