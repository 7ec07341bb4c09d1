"""DDP on 2 CPU processes (gloo): the loss and gradients the trainer's DDP setup produces equal those
of one process over the full batch, so negatives really are global across ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import TrainConfig
from pipeline.training.losses import WeightedClipLoss
from pipeline.training.model import encode_text, starting_model
from tests.conftest import free_port

WORLD = 2
BATCH = 8


class Step(torch.nn.Module):
    """What Lightning's DDP wrapper runs per rank: embed the local batch, loss over all ranks."""

    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images, tokens, weights):
        image = self.model.encode_image(images, normalize=True)
        text = encode_text(self.model, tokens)
        return self.loss(image, text, self.model.logit_scale.exp(), weights=weights)


def _batch():
    bundle = starting_model(TrainConfig(seed=0))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 64, 64, generator=generator)
    tokens = bundle.tokenizer([f"query number {n}" for n in range(BATCH)])
    weights = torch.rand(BATCH, generator=generator) + 0.5
    return bundle.model, images, tokens, weights


def _rank(rank: int, port: int, weighted: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, images, tokens, weights = _batch()
        step = DistributedDataParallel(Step(model, WeightedClipLoss(gather_with_grad=True, rank=rank,
                                                                    world_size=WORLD)))
        mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        loss = step(images[mine], tokens[mine], weights[mine] if weighted else None)
        loss.backward()  # DDP averages the gradients across ranks here
        torch.save({"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("weighted", [False, True])
def test_ddp_loss_and_gradients_equal_the_single_process_full_batch(tmp_path, weighted):
    out = str(tmp_path / "grads")
    mp.start_processes(_rank, args=(free_port(), weighted, out), nprocs=WORLD, join=True, start_method="spawn")

    model, images, tokens, weights = _batch()
    single = Step(model, WeightedClipLoss())(images, tokens, weights if weighted else None)
    single.backward()
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(got["loss"], single.detach(), rtol=1e-5, atol=1e-6)
        for name, param in model.named_parameters():
            torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.e2e
def test_clickclip_train_runs_under_lightning_ddp_on_two_cpu_processes(tiny_shop, tmp_path):
    """The real launcher: Lightning re-runs `clickclip train` for rank 1, which joins under the
    parent's run lock, trains on its half of each epoch and leaves the results to rank 0."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from tests.conftest import shop_config

    cfg = shop_config(tiny_shop, tmp_path, train={"epochs": 1, "accelerator": "cpu", "devices": 2,
                                                  "strategy": "ddp"})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cli = Path(sys.executable).with_name("clickclip")
    for stage in ("extract", "split", "train"):
        done = subprocess.run([str(cli), stage, "--config", str(config), "--run-id", "ddp", "--json"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    single_rank_steps = summary["train_pairs"] // cfg.train.batch_size
    assert 0 < summary["steps"] <= single_rank_steps // 2  # each rank took half of the batches
    assert summary["finished_without_nan"]
    assert (tmp_path / "runs" / "ddp" / "train" / "model" / "open_clip_model.safetensors").is_file()
