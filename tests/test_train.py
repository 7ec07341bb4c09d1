from pathlib import Path

import pytest
import torch
from open_clip.loss import ClipLoss

from pipeline.config import TrainConfig
from pipeline.training.grad_cache import grad_cache_backward
from pipeline.training.model import starting_model


def _batch(bundle, n: int):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 64, 64, generator=generator)
    tokens = bundle.tokenizer([f"query number {i} red mug" for i in range(n)])
    return images, tokens


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("learn_temperature", [True, False])
def test_grad_cache_equals_one_big_batch(learn_temperature):
    bundle = starting_model(TrainConfig(seed=0))
    model = bundle.model.double()
    model.logit_scale.requires_grad_(learn_temperature)
    images, tokens = _batch(bundle, 16)
    images = images.double()
    loss_fn = ClipLoss()

    model.zero_grad()
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(tokens, normalize=True)
    big_loss = loss_fn(image_features, text_features, model.logit_scale.exp())
    big_loss.backward()
    expected = _grads(model)

    model.zero_grad()
    cached_loss = grad_cache_backward(model, images, tokens, micro_batch=4, loss_fn=loss_fn)
    got = _grads(model)

    assert cached_loss.item() == pytest.approx(big_loss.item(), rel=1e-10)
    assert got.keys() == expected.keys()
    assert ("logit_scale" in got) is learn_temperature
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-7, atol=1e-10, msg=name)


def test_plain_accumulation_would_differ():
    """The reason grad caching exists: per-micro-batch losses see fewer negatives."""
    bundle = starting_model(TrainConfig(seed=0))
    model = bundle.model.double()
    images, tokens = _batch(bundle, 16)
    images = images.double()
    loss_fn = ClipLoss()
    model.zero_grad()
    grad_cache_backward(model, images, tokens, micro_batch=4, loss_fn=loss_fn)
    cached = _grads(model)
    model.zero_grad()
    for i in range(4):
        chunk = slice(4 * i, 4 * i + 4)
        loss = loss_fn(model.encode_image(images[chunk], normalize=True),
                       model.encode_text(tokens[chunk], normalize=True), model.logit_scale.exp()) / 4
        loss.backward()
    accumulated = _grads(model)
    assert not torch.allclose(cached["visual.proj"], accumulated["visual.proj"])


@pytest.mark.parametrize("negatives", ["in_batch", "grad_cache", "memory_bank"])
def test_train_stage_runs_and_writes_a_loadable_checkpoint(tiny_shop, tmp_path, negatives):
    import polars as pl

    from pipeline.stages.extract import extract
    from pipeline.stages.split import split
    from pipeline.stages.train import train
    from pipeline.training.model import load_checkpoint
    from tests.conftest import shop_config

    # in_batch also scores WiSE-FT's ends: alpha 1 is the trained model, so its score must be the epoch's
    speed = {"in_batch": {"image_cache": True, "channels_last": True, "wise_ft_alphas": [0.0, 1.0]},
             "memory_bank": {"precision": "bf16-mixed"}}.get(negatives, {})
    cfg = shop_config(tiny_shop, tmp_path, train={
        "epochs": 1, "negatives": negatives, "micro_batch_size": 8, "memory_bank_size": 64,
        "memory_bank_warmup_steps": 2, "pair_weights": "extract", **speed})
    for stage in ("extract", "split", "train"):
        (tmp_path / stage).mkdir()
    pairs = extract(cfg, tmp_path / "extract").pairs
    split_result = split(cfg, pairs, tmp_path / "split")
    result = train(cfg, split_result.pairs, split_result.images, tmp_path / "train", "test-run")
    assert result.summary["finished_without_nan"]
    # unique-key batches pack a little below train_pairs / batch_size
    assert 0.5 * result.summary["train_pairs"] // cfg.train.batch_size <= result.summary["steps"] \
        <= result.summary["train_pairs"] // cfg.train.batch_size
    heldout = pl.read_parquet(split_result.pairs).filter(pl.col("query_heldout") & (pl.col("split") == "train")
                                                         & (pl.col("clicks") > 0))
    assert result.summary["train_pairs"] + heldout.height <= pl.read_parquet(split_result.pairs).filter(
        (pl.col("split") == "train") & (pl.col("clicks") > 0)).height
    load_checkpoint(result.model_dir.parent)
    if negatives == "in_batch":
        curve = dict(result.summary["wise_ft"]["curve"])
        assert sorted(curve) == [0.0, 1.0]
        assert curve[1.0] == pytest.approx(result.summary["best_val_recall@10"], abs=1e-4)


def test_weighted_clip_loss():
    from pipeline.training.losses import WeightedClipLoss

    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    scale = torch.tensor(10.0)
    loss = WeightedClipLoss()
    assert loss(image, text, scale, weights=torch.full((6,), 3.0)).item() == pytest.approx(
        ClipLoss()(image, text, scale).item(), rel=1e-6)
    weights = torch.tensor([5.0, 1, 1, 1, 1, 1])
    logits = scale * image @ text.T
    labels = torch.arange(6)
    per_pair = (torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                + torch.nn.functional.cross_entropy(logits.T, labels, reduction="none")) / 2
    expected = (per_pair * weights / weights.mean()).mean()
    assert loss(image, text, scale, weights=weights).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_blockwise_loss_equals_the_full_matrix_loss_and_gradients(weighted):
    """Above `block` pairs the loss runs in checkpointed row blocks: same value, same gradients."""
    from pipeline.training.losses import WeightedClipLoss

    generator = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(22, 8, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(22, 8, generator=generator), dim=-1)
    weights = torch.rand(22, generator=generator) + 0.5 if weighted else None
    results = []
    for block in (10_000, 5):  # one block (open_clip's path) against five blocks, the last short
        i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
        scale = torch.tensor(12.0, requires_grad=True)
        loss = WeightedClipLoss(block=block)(i, t, scale, weights=weights)
        loss.backward()
        results.append((loss.detach(), i.grad, t.grad, scale.grad))
    for full, blocked in zip(*results, strict=True):
        torch.testing.assert_close(blocked, full, rtol=1e-5, atol=1e-7)


def test_tower_locking_freezes_all_but_the_last_groups():
    from pipeline.training.finetuner import lock_towers

    bundle = starting_model(TrainConfig(seed=0))
    lock_towers(bundle.model, TrainConfig(lock_image=True, lock_image_unlocked_groups=1, lock_text=True))
    trainable = {name for name, p in bundle.model.named_parameters() if p.requires_grad}
    assert not any(name.startswith(("transformer.", "token_embedding")) for name in trainable)
    assert any(name.startswith("visual.") for name in trainable)  # the last group stays open
    assert not any(name.startswith("visual.conv1") for name in trainable)
    assert "logit_scale" in trainable


def test_siglip_loss_trains_a_logit_bias_that_the_checkpoint_keeps(tiny_shop, tmp_path):
    from pipeline.stages.extract import extract
    from pipeline.stages.split import split
    from pipeline.stages.train import train
    from pipeline.training.model import SIGLIP_LOGIT_BIAS, load_checkpoint
    from tests.conftest import shop_config

    cfg = shop_config(tiny_shop, tmp_path, train={"epochs": 1, "loss": "siglip"})
    for stage in ("extract", "split", "train"):
        (tmp_path / stage).mkdir()
    split_result = split(cfg, extract(cfg, tmp_path / "extract").pairs, tmp_path / "split")
    result = train(cfg, split_result.pairs, split_result.images, tmp_path / "train", "siglip-run")
    assert result.summary["finished_without_nan"]
    bias = load_checkpoint(result.model_dir.parent).model.logit_bias.item()
    assert bias != SIGLIP_LOGIT_BIAS  # learned, saved and reloaded


def test_siglip_refuses_settings_it_does_not_support():
    with pytest.raises(ValueError, match="siglip"):
        TrainConfig(loss="siglip", negatives="memory_bank")


TRAIN_CHILD = """
import json, os, signal, sys
from pathlib import Path
import lightning as L
from tests.conftest import shop_config
from pipeline.stages.train import train
shop, work, pairs, images, out, kill_at = sys.argv[1:7]

class KillAt(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as the kernel's OOM killer would

cfg = shop_config(Path(shop), Path(work), train={"epochs": 2})
result = train(cfg, Path(pairs), Path(images), Path(out), Path(out).name, [KillAt()] if int(kill_at) else [])
print(json.dumps({k: result.summary[k] for k in ("steps", "steps_this_attempt", "samples_per_s", "fit_seconds")}))
"""


def test_sigkill_mid_epoch_then_rerun_ends_with_the_same_weights(tiny_shop, tmp_path):
    """... and the rerun's throughput counts only the steps it ran (not all of them over its time)."""
    import json
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from pipeline.stages.extract import extract
    from pipeline.stages.split import split
    from tests.conftest import shop_config

    cfg = shop_config(tiny_shop, tmp_path)
    for stage in ("extract", "split"):
        (tmp_path / stage).mkdir()
    split_result = split(cfg, extract(cfg, tmp_path / "extract").pairs, tmp_path / "split")
    root = Path(__file__).resolve().parents[1]

    def child(out: str, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", TRAIN_CHILD, str(tiny_shop), str(tmp_path),
                               str(split_result.pairs), str(split_result.images), str(tmp_path / out), str(kill_at)],
                              cwd=root, capture_output=True, text=True)

    def summary(done: subprocess.CompletedProcess) -> dict:
        return json.loads(done.stdout.strip().splitlines()[-1])

    straight = child("straight", 0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    steps = summary(straight)["steps"]
    assert summary(straight)["steps_this_attempt"] == steps
    killed = child("resumed", steps // 2 + steps // 4)  # in the middle of the second epoch
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "resumed" / "lightning" / "last.ckpt").is_file()
    assert not (tmp_path / "resumed" / "model").exists()
    rerun = child("resumed", 0)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = summary(rerun)
    assert resumed["steps"] == steps
    # the rerun resumed from the end of epoch 1 and ran epoch 2 only: its throughput counts those steps
    assert resumed["steps_this_attempt"] == steps // 2
    assert resumed["fit_seconds"] > 0 and resumed["samples_per_s"] > 0
    expected = load_file(tmp_path / "straight" / "model" / "open_clip_model.safetensors")
    got = load_file(tmp_path / "resumed" / "model" / "open_clip_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_image_cache_serves_the_decoded_images(tiny_shop, tmp_path):
    import pickle

    import polars as pl

    from pipeline.training.datasets import PairDataset
    from pipeline.training.image_cache import ImageCache

    catalog = pl.read_parquet(tiny_shop / "images.parquet").head(40)
    usable = [p for p in catalog["path"] if (tiny_shop / "images" / p).is_file()
              and (tiny_shop / "images" / p).read_bytes()[:4] == b"\x89PNG"]
    pairs = pl.DataFrame({"query": ["q"] * len(usable), "image_id": usable, "product_id": [None] * len(usable),
                          "path": usable, "weight": [1.0] * len(usable)})
    bundle = starting_model(TrainConfig(seed=0))
    cache = ImageCache(tmp_path / "cache", usable, tiny_shop / "images", 64)
    built = cache.file.stat().st_mtime_ns
    plain = PairDataset(pairs, tiny_shop / "images", bundle, train=False)
    cached = PairDataset(pairs, tiny_shop / "images", bundle, train=False, cache=cache)
    for i in range(len(usable)):
        torch.testing.assert_close(cached[i][0], plain[i][0])  # 64-px demo photos: the square is the photo
    # workers get the path, not the array; a second construction reuses the file
    assert pickle.loads(pickle.dumps(cache))._array is None
    assert ImageCache(tmp_path / "cache", usable, tiny_shop / "images", 64).file.stat().st_mtime_ns == built


def test_compile_in_place_keeps_parameter_names():
    bundle = starting_model(TrainConfig(seed=0))
    names = list(bundle.model.state_dict())
    bundle.model.visual.compile()
    bundle.model.transformer.compile()
    assert list(bundle.model.state_dict()) == names


def test_weight_decay_spares_gains_biases_temperature_and_embeddings():
    from pipeline.training.optim import parameter_groups

    model = starting_model(TrainConfig()).model
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "token_embedding.weight", "positional_embedding"} <= spared
    assert all(p.ndim >= 2 and "embedding" not in names[id(p)] for p in decay["params"])
    assert {"text_projection", "visual.proj"} <= {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_training_in_a_log_prints_progress_lines(tiny_shop, tmp_path, capsys):
    from pipeline.stages.extract import extract
    from pipeline.stages.split import split
    from pipeline.stages.train import train
    from tests.conftest import shop_config

    cfg = shop_config(tiny_shop, tmp_path, train={"epochs": 2, "log_every_steps": 10})
    for stage in ("extract", "split", "train"):
        (tmp_path / stage).mkdir()
    split_result = split(cfg, extract(cfg, tmp_path / "extract").pairs, tmp_path / "split")
    capsys.readouterr()
    result = train(cfg, split_result.pairs, split_result.images, tmp_path / "train", "logged")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: epoch")]
    epochs = [line for line in lines if "val recall@10" in line]
    assert len(epochs) == 2 and "epoch 2/2" in epochs[-1] and "samples/s" in epochs[-1] and "ETA" in epochs[-1]
    assert len(lines) - len(epochs) >= result.summary["steps"] // 10 - 1  # the lines every 10 steps


def test_an_attempt_that_trained_no_step_reports_no_throughput():
    """A rerun that resumes with no epoch left never starts fitting: 0 steps, 0 samples/s (not
    every step over no time)."""
    from pipeline.training.finetuner import ClipFineTuner

    cfg = TrainConfig(seed=0)
    assert ClipFineTuner(starting_model(cfg), cfg).throughput() == (0, 0.0)


def test_relevance_pair_weights_are_the_debiased_click_rate():
    """pair_weights: relevance divides extract's click weight by the pair's impressions: a pair
    clicked 5 times in 100 showings weighs less than one clicked twice in 4."""
    import polars as pl

    from pipeline.training.datasets import loss_weights

    pairs = pl.DataFrame({"query": ["navy dress"] * 2, "image_id": ["red", "navy"], "clicks": [5, 2],
                          "impressions": [100, 4], "weight": [7.5, 2.5]})
    assert loss_weights(pairs, "extract")["weight"].to_list() == [7.5, 2.5]
    assert loss_weights(pairs, "none")["weight"].to_list() == [7.5, 2.5]
    assert loss_weights(pairs, "relevance")["weight"].to_list() == [0.075, 0.625]
    with pytest.raises(ValueError, match="pair_weights none"):
        TrainConfig(loss="siglip", pair_weights="relevance")


def test_the_train_stage_feeds_relevance_weights_to_the_loss(tiny_shop, tmp_path, monkeypatch):
    """pair_weights: relevance through the stage: every training batch's weights are the pairs'
    click weight per impression, and the fine-tuner hands them to the loss."""
    import lightning as L
    import polars as pl

    from pipeline.stages.extract import extract
    from pipeline.stages.split import split
    from pipeline.stages.train import train
    from pipeline.training import negatives
    from tests.conftest import shop_config

    seen, given = [], []

    class Batches(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((list(batch[1]), list(batch[2]), batch[4].tolist()))

    cfg = shop_config(tiny_shop, tmp_path, train={"epochs": 1, "pair_weights": "relevance"})
    for stage in ("extract", "split", "train"):
        (tmp_path / stage).mkdir()
    split_result = split(cfg, extract(cfg, tmp_path / "extract").pairs, tmp_path / "split")
    step = negatives.InBatchNegatives.step

    def recording(self, module, batch, loss, weights):
        given.append(weights)
        return step(self, module, batch, loss, weights)

    monkeypatch.setattr(negatives.InBatchNegatives, "step", recording)
    train(cfg, split_result.pairs, split_result.images, tmp_path / "train", "rel", [Batches()])
    pairs = pl.read_parquet(split_result.pairs)
    rate = {(q, i): w / n for q, i, w, n in pairs.select("query", "image_id", "weight", "impressions").iter_rows()}
    assert seen and len(given) == len(seen) and all(w is not None for w in given)
    for texts, images, weights in seen:
        assert weights == pytest.approx([rate[(q, i)] for q, i in zip(texts, images, strict=True)], rel=1e-6)
    raw = {(q, i): w for q, i, w in pairs.select("query", "image_id", "weight").iter_rows()}
    texts, images, weights = seen[0]
    assert weights != pytest.approx([raw[(q, i)] for q, i in zip(texts, images, strict=True)], rel=1e-6)
