"""BatchNorm towers (the demo's ClickCLIP-TinyRN) under each way of finding negatives: grad cache is
exact with frozen BatchNorm and refused without it; the memory bank's step is the in-batch step."""

import pytest
import torch
from open_clip.loss import ClipLoss

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.training.grad_cache import grad_cache_backward
from pipeline.training.memory_bank import MemoryBank, key_ids, memory_bank_loss
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


@pytest.mark.parametrize("filled", [False, True])
def test_memory_bank_step_with_batchnorm_is_the_in_batch_step(filled):
    """One forward pass over the whole batch, as in-batch training: the same batch statistics and
    one running-statistics update; with an empty memory, the same loss and gradients too (the
    memory's entries are constants, so they add negatives, not BatchNorm effects)."""
    bundle = starting_model(TrainConfig(model=RN, seed=0))
    model = bundle.model.double().train()
    images, tokens = _batch(bundle, 8)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    in_batch_loss, in_batch_grads = _full_batch(model, images, tokens, ClipLoss())
    in_batch_running = _running(model)

    model.load_state_dict(start)
    model.zero_grad()
    bank = MemoryBank(16, 64).double()
    if filled:
        other = torch.nn.functional.normalize(torch.randn(6, 64, dtype=torch.float64), dim=-1)
        bank.enqueue(other, other, torch.stack([key_ids([f"o{i}" for i in range(6)])] * 3, dim=1))
    keys = torch.stack([key_ids([f"i{i}" for i in range(8)]), key_ids([None] * 8),
                        key_ids([f"q{i}" for i in range(8)])], dim=1)
    loss = memory_bank_loss(model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True),
                            model.logit_scale.exp(), bank, keys)
    loss.backward()
    for name, value in _running(model).items():
        assert torch.equal(value, in_batch_running[name]), name
    if not filled:
        assert loss.item() == pytest.approx(in_batch_loss.item(), rel=1e-10)
        for name, grad in _grads(model).items():
            torch.testing.assert_close(grad, in_batch_grads[name], rtol=1e-7, atol=1e-10, msg=name)
    else:
        assert loss.item() > in_batch_loss.item()  # more negatives, a larger loss


def test_the_fine_tuner_keeps_frozen_batchnorm_in_eval_mode_across_train_calls():
    from pipeline.training.finetuner import ClipFineTuner

    cfg = TrainConfig(model=RN, negatives="grad_cache", batchnorm="frozen", micro_batch_size=4)
    module = ClipFineTuner(starting_model(cfg), cfg)
    module.eval()
    module.train()  # what Lightning calls at every epoch's start and after validation
    norms = [m for m in module.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert module.model.visual.conv1.training
    plain = TrainConfig(model=RN)
    trained = ClipFineTuner(starting_model(plain), plain)
    trained.eval()
    trained.train()
    assert all(m.training for m in trained.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
