"""DDP on 2 CPU processes (gloo): the loss and gradients the trainer's DDP setup produces equal those
of one process over the full batch, so negatives really are global across ranks: in-batch
negatives with open_clip's local loss (build_loss), and grad cache across ranks."""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import TrainConfig
from pipeline.training.grad_cache import grad_cache_backward
from pipeline.training.losses import WeightedClipLoss, build_loss
from pipeline.training.model import encode_text, freeze_batchnorm, starting_model
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


def _batch(model: str = "ClickCLIP-Tiny"):
    """The model (BatchNorm frozen, as train.batchnorm: frozen sets it) and one batch of 8."""
    bundle = starting_model(TrainConfig(model=model, seed=0))
    freeze_batchnorm(bundle.model)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 64, 64, generator=generator)
    tokens = bundle.tokenizer([f"query number {n}" for n in range(BATCH)])
    weights = torch.rand(BATCH, generator=generator) + 0.5
    return bundle.model, images, tokens, weights


@contextmanager
def _process_group(rank: int, port: int):
    """This process as rank `rank` of a gloo group of WORLD on this machine."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rank(rank: int, port: int, weighted: bool, out: str) -> None:
    with _process_group(rank, port):
        model, images, tokens, weights = _batch()
        loss_fn = build_loss(TrainConfig(), model, rank, WORLD)  # as ClipFineTuner.setup builds it under DDP
        assert loss_fn.local_loss and loss_fn.gather_with_grad
        step = DistributedDataParallel(Step(model, loss_fn))
        mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        loss = step(images[mine], tokens[mine], weights[mine] if weighted else None)
        loss.backward()  # DDP averages the gradients across ranks here
        with torch.no_grad():  # this rank's rows only: world-size times fewer logits than the full matrix
            features = model.encode_image(images[mine], normalize=True), encode_text(model, tokens[mine])
            rows, columns = loss_fn.get_logits(*features, model.logit_scale.exp())[0].shape
        torch.save({"loss": loss.detach(), "logits": torch.tensor([rows, columns]),
                    **{n: p.grad for n, p in model.named_parameters()}}, f"{out}.{rank}")


@pytest.mark.parametrize("weighted", [False, True])
def test_ddp_loss_and_gradients_equal_the_single_process_full_batch(tmp_path, weighted):
    out = str(tmp_path / "grads")
    mp.start_processes(_rank, args=(free_port(), weighted, out), nprocs=WORLD, join=True, start_method="spawn")

    model, images, tokens, weights = _batch()
    single = Step(model, WeightedClipLoss())(images, tokens, weights if weighted else None)
    single.backward()
    got = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD)]
    # each rank's loss covers its own rows; their mean is the full batch's loss
    torch.testing.assert_close(torch.stack([g["loss"] for g in got]).mean(), single.detach(), rtol=1e-5, atol=1e-6)
    for rank in range(WORLD):
        assert got[rank]["logits"].tolist() == [BATCH // WORLD, BATCH]
        for name, param in model.named_parameters():
            torch.testing.assert_close(got[rank][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def _grad_cache_rank(rank: int, port: int, weighted: bool, out: str, model_name: str) -> None:
    with _process_group(rank, port):
        model, images, tokens, weights = _batch(model_name)
        mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        loss = grad_cache_backward(model, images[mine], tokens[mine], 2, WeightedClipLoss(),
                                   weights=weights[mine] if weighted else None, world_size=WORLD, rank=rank)
        running = {f"buffer:{n}": b for n, b in model.named_buffers() if "running" in n}
        torch.save({"loss": loss, **running, **{n: p.grad for n, p in model.named_parameters()}}, f"{out}.{rank}")


def _uneven_rank(rank: int, port: int, out: str) -> None:
    from pipeline.errors import StageError

    with _process_group(rank, port):
        model, images, tokens, _ = _batch()
        mine = slice(0, 4 if rank == 0 else 3)
        try:
            grad_cache_backward(model, images[mine], tokens[mine], 2, WeightedClipLoss(), world_size=WORLD, rank=rank)
        except StageError as exc:
            Path(f"{out}.{rank}").write_text(str(exc))


def test_grad_cache_across_ranks_refuses_unequal_batches_by_name(tmp_path):
    """Every rank stops with the sizes named, instead of a backend error deep in all_gather."""
    out = str(tmp_path / "error")
    mp.start_processes(_uneven_rank, args=(free_port(), out), nprocs=WORLD, join=True, start_method="spawn")
    for rank in range(WORLD):
        assert "same batch size on every rank; got [4, 3]" in Path(f"{out}.{rank}").read_text()


@pytest.mark.parametrize(("weighted", "model_name"), [(False, "ClickCLIP-Tiny"), (True, "ClickCLIP-Tiny"),
                                                     (True, "ClickCLIP-TinyRN")])
def test_grad_cache_across_ranks_equals_the_single_process_full_batch(tmp_path, weighted, model_name):
    """Each rank embeds its 4 pairs in micro-batches of 2, the loss runs over all 8 gathered pairs,
    each rank re-runs only its own micro-batches: every rank ends with the gradients (temperature
    included, learned) of one process over the 8 pairs at once. The ResNet with its BatchNorm
    frozen (train.batchnorm: frozen) too; its running statistics stay as they were."""
    out = str(tmp_path / "grads")
    mp.start_processes(_grad_cache_rank, args=(free_port(), weighted, out, model_name), nprocs=WORLD, join=True,
                       start_method="spawn")

    model, images, tokens, weights = _batch(model_name)
    assert model.logit_scale.requires_grad
    single = Step(model, WeightedClipLoss())(images, tokens, weights if weighted else None)
    single.backward()
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(got["loss"], single.detach(), rtol=1e-5, atol=1e-6)
        for name, param in model.named_parameters():
            torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
        running = {name: buffer for name, buffer in model.named_buffers() if "running" in name}
        assert (len(running) > 0) is (model_name == "ClickCLIP-TinyRN")
        for name, buffer in running.items():  # fresh from the seeded init, as every rank's started
            assert torch.equal(got[f"buffer:{name}"], buffer), name


def _clicks_log(n: int = 600):
    """A click log's shape: few queries and products, repeated (seeded)."""
    import random

    rng = random.Random(0)
    products = [f"p{rng.randrange(40)}" for _ in range(n)]
    return ([f"q{rng.randrange(60)}" for _ in range(n)], [f"{p}-{rng.randrange(3)}" for p in products],
            [p if rng.random() < 0.9 else None for p in products])


def _unique_rank(rank: int, port: int, out: str) -> None:
    """One rank as ClipFineTuner.setup leaves its sampler: sharded; every step's keys gathered."""
    from pipeline.training.samplers import UniqueBatchSampler

    with _process_group(rank, port):
        queries, images, products = _clicks_log()
        sampler = UniqueBatchSampler(queries, images, products, batch_size=4, seed=3)
        sampler.shard(rank, WORLD)
        steps = []
        for _ in range(2):  # two epochs
            for batch in sampler:
                mine = [(queries[i], images[i], products[i]) for i, _ in batch]
                everyone: list = [None] * WORLD
                dist.all_gather_object(everyone, mine)
                steps.append(everyone)
        if rank == 0:
            Path(out).write_text(json.dumps({"steps": steps, "length": len(sampler)}))


def test_unique_batches_hold_across_all_ranks_of_a_step(tmp_path):
    """Under DDP the loss of a step spans every rank's batch: no query, image or product twice
    in the union of the ranks' batches of one step, every rank with a full batch."""
    out = str(tmp_path / "steps")
    mp.start_processes(_unique_rank, args=(free_port(), out), nprocs=WORLD, join=True, start_method="spawn")
    got = json.loads(Path(out).read_text())
    assert got["length"] > 10 and len(got["steps"]) == 2 * got["length"]
    for step in got["steps"]:
        rows = [row for rank_rows in step for row in rank_rows]
        assert all(len(rank_rows) == 4 for rank_rows in step)
        for column in range(3):
            keys = [row[column] for row in rows if row[column] is not None]
            assert len(keys) == len(set(keys)), (column, step)


@pytest.mark.e2e
@pytest.mark.parametrize("negatives", ["in_batch", "grad_cache"])
def test_clickclip_train_runs_under_lightning_ddp_on_two_cpu_processes(tiny_shop, tmp_path, negatives):
    """The real launcher: Lightning re-runs `clickclip train` for rank 1, which joins under the
    parent's run lock, trains on its half of each epoch and leaves the results to rank 0 (grad
    cache: its backward passes outside DDP's reducer, gradients summed across ranks once)."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from tests.conftest import shop_config

    cfg = shop_config(tiny_shop, tmp_path, train={"epochs": 1, "accelerator": "cpu", "devices": 2,
                                                  "strategy": "ddp", "negatives": negatives, "micro_batch_size": 4})
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
