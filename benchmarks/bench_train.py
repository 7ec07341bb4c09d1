"""Training throughput: this project's trainer against open_clip's own training script, one invocation.

    python benchmarks/bench_train.py            # on a GPU: ViT-B-32, batch 1024, bf16
    python benchmarks/bench_train.py --smoke    # on CPU: the tiny model, a few small steps (CI)

Both sides train on synthetic data shaped alike: one fixed photo run through the model's train
transform per sample (open_clip's `--dataset-type synthetic` does the same), with short
click-log queries on our side (open_clip's synthetic captions are padded to 77 tokens; trimming
them away is one of the things measured). Only steady-state steps count: the first
`--warmup-steps` are dropped. Also measured: grad-cache at a large effective batch from
micro-batches (samples/s and peak GPU memory) and the memory bank.
open_clip's script needs the `bench` extra (`pip install -e .[bench]`); without it its figure is null.
Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.stages.train import build_trainer, prepare_model  # noqa: E402
from pipeline.training.datasets import TokenizingCollate  # noqa: E402
from pipeline.training.finetuner import ClipFineTuner  # noqa: E402
from pipeline.training.model import save_checkpoint, split_transform, starting_model  # noqa: E402

WORDS = ("navy", "red", "striped", "linen", "dress", "trainers", "mug", "lamp", "wool", "coat", "oak", "desk")


class SyntheticPairs(Dataset):
    """Items shaped like PairDataset's: one fixed photo through the train transform's host part
    (uint8, normalised on the device as in training), short queries."""

    def __init__(self, transform, size: int, image_size: int):
        rng = np.random.default_rng(0)
        self.image = Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
        self.transform, self.size = transform, size
        self.queries = [" ".join(rng.choice(WORDS, rng.integers(2, 5))) for _ in range(1024)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return self.transform(self.image), self.queries[index % 1024], f"i{index}", "", 1.0


class StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def run_ours(args, negatives: str, batch: int, steps: int | None = None, warmup: int | None = None,
             compile: bool = False) -> tuple[float, float | None]:
    """Steady-state samples/s and peak GPU memory (GB) of the real ClipFineTuner under Lightning."""
    steps, warmup = steps or args.steps, warmup or args.warmup_steps
    cfg = TrainConfig(model=args.model, batch_size=batch, negatives=negatives, micro_batch_size=args.micro_batch,
                      memory_bank_size=args.memory_bank, memory_bank_warmup_steps=0, precision=args.precision,
                      accelerator="gpu" if args.cuda else "cpu", warmup_steps=1, compile=compile,
                      num_workers=args.workers)
    bundle = starting_model(cfg)
    prepare_model(bundle, cfg)  # as train() does (torch.compile in place when cfg.compile)
    image_size = bundle.model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple | list) else image_size
    dataset = SyntheticPairs(split_transform(bundle.preprocess_train)[0], batch * (steps + warmup), image_size)
    # every worker builds whole batches: bound what is in flight (uint8 pixels) to about --loader-gb
    batch_gb = batch * 3 * image_size**2 / 2**30
    workers = max(1, min(args.workers, int(args.loader_gb / batch_gb))) if args.workers else 0
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, pin_memory=args.cuda, drop_last=True,
                        collate_fn=TokenizingCollate(bundle.tokenizer),
                        persistent_workers=workers > 0, prefetch_factor=(2 if workers == args.workers else 1)
                        if workers else None)
    timer = StepTimer()
    # the Trainer train() builds (deterministic mode, clipping, precision as shipped), minus its
    # checkpoints, logger and validation
    trainer = build_trainer(cfg, False, [timer], max_steps=steps + warmup, devices=1, enable_checkpointing=False,
                            enable_progress_bar=False, limit_val_batches=0)
    if args.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(ClipFineTuner(bundle, cfg), loader)
    steady = timer.times[warmup - 1:]
    per_s = batch * (len(steady) - 1) / (steady[-1] - steady[0])
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.cuda else None
    return per_s, peak


def run_open_clip(args, folder: Path, compile: bool = False) -> float | None:
    """Steady-state samples/s of `python -m open_clip_train.main --dataset-type synthetic`
    (with `--torchcompile` when `compile`)."""
    try:
        import open_clip_train.main  # noqa: F401
    except ImportError as exc:
        print(f"open_clip's training script is not importable ({exc}); install the bench extra")
        return None
    model = args.model if args.model in _builtin_models() else f"local-dir:{folder}"
    with tempfile.TemporaryDirectory() as logs:
        command = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "synthetic",
                   "--train-num-samples", str(args.batch * (args.steps + args.warmup_steps)),
                   "--batch-size", str(args.batch), "--model", model, "--epochs", "1",
                   "--workers", str(args.workers), "--log-every-n-steps", "1", "--logs", logs, "--name", "bench",
                   "--precision", "amp_bf16" if args.precision.startswith("bf16") else "fp32",
                   "--save-frequency", "0", "--report-to", ""]
        if not args.cuda:
            command += ["--device", "cpu"]
        if compile:
            command += ["--torchcompile"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=logs)
    rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", done.stdout + done.stderr)]
    if done.returncode != 0 or len(rates) <= args.warmup_steps:
        print(f"open_clip's script failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")
        return None
    return statistics.median(rates[args.warmup_steps:])


def flops_per_sample(model: str) -> float:
    """Forward + backward FLOPs of one (image, 8-token query) pair, counted by torch's FlopCounterMode
    on a forward pass (backward taken as twice the forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    bundle = starting_model(TrainConfig(model=model))
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    tokens = bundle.tokenizer(["navy rain shell jacket for women"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bundle.model(torch.zeros(1, 3, size, size), tokens)
    return 3.0 * counter.get_total_flops()


def _builtin_models() -> set[str]:
    import open_clip

    return set(open_clip.list_models()) - {"ClickCLIP-Tiny"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU configuration (CI)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--grad-cache-batch", type=int, default=None)
    parser.add_argument("--memory-bank", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--grad-cache-steps", type=int, default=None,
                        help="steady steps at the grad-cache batch (one warm-up step before them)")
    parser.add_argument("--grad-cache-max-batch", type=int, default=None,
                        help="also run one grad-cache batch this large, for its peak memory")
    parser.add_argument("--loader-gb", type=float, default=24.0,
                        help="host memory for batches in flight from the loader workers")
    parser.add_argument("--compile", action="store_true",
                        help="also time our trainer with torch.compile against open_clip's --torchcompile")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak at this precision, for MFU (H100/H200 SXM bf16: 989)")
    args = parser.parse_args()
    args.cuda = torch.cuda.is_available() and not args.smoke
    big = {"model": "ViT-B-32", "batch": 1024, "micro_batch": 1024, "grad_cache_batch": 32768,
           "memory_bank": 16384, "steps": 30, "warmup_steps": 5, "workers": 12, "precision": "bf16-mixed",
           "grad_cache_steps": 3, "grad_cache_max_batch": 65536}
    tiny = {"model": "ClickCLIP-Tiny", "batch": 32, "micro_batch": 16, "grad_cache_batch": 128,
            "memory_bank": 256, "steps": 4, "warmup_steps": 2, "workers": 0, "precision": "32-true",
            "grad_cache_steps": 3, "grad_cache_max_batch": 256}
    for key, value in (big if args.cuda else tiny).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = torch.cuda.get_device_name() if args.cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}; model {args.model}, batch {args.batch}, {args.precision}")

    ours, _ = run_ours(args, "in_batch", args.batch)
    print(f"ours (in-batch, batch {args.batch}): {ours:,.0f} samples/s")
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(starting_model(TrainConfig(model=args.model)), Path(folder))
        theirs = run_open_clip(args, Path(folder))
    if theirs:
        print(f"open_clip_train.main (synthetic, batch {args.batch}): {theirs:,.0f} samples/s; "
              f"ratio {ours / theirs:.2f}")
    compiled = run_ours(args, "in_batch", args.batch, compile=True)[0] if args.compile else None
    theirs_compiled = None
    if compiled:
        print(f"ours, torch.compile (in-batch, batch {args.batch}): {compiled:,.0f} samples/s")
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(starting_model(TrainConfig(model=args.model)), Path(folder))
            theirs_compiled = run_open_clip(args, Path(folder), compile=True)
        if theirs_compiled:
            print(f"open_clip_train.main --torchcompile: {theirs_compiled:,.0f} samples/s; "
                  f"ratio {compiled / theirs_compiled:.2f}")
    flops = flops_per_sample(args.model)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    mfu = {name: round(rate * flops / peak, 4) if peak and rate else None
           for name, rate in (("ours", ours), ("ours_compiled", compiled))}
    print(f"model FLOPs per sample (forward + backward, image + text): {flops / 1e9:.2f} GFLOP; "
          f"MFU {mfu['ours']} eager, {mfu['ours_compiled']} compiled"
          + ("" if peak else " (pass --peak-tflops for this device's dense peak)"))
    cached, cached_peak = run_ours(args, "grad_cache", args.grad_cache_batch, args.grad_cache_steps, 1)
    print(f"grad cache (effective {args.grad_cache_batch} from {args.micro_batch}): {cached:,.0f} samples/s"
          + (f", peak {cached_peak:.1f} GB" if cached_peak else ""))
    big_batch = args.grad_cache_max_batch
    big, big_peak = run_ours(args, "grad_cache", big_batch, 1, 1)
    print(f"grad cache (effective {big_batch} from {args.micro_batch}): {big:,.0f} samples/s"
          + (f", peak {big_peak:.1f} GB" if big_peak else ""))
    bank, _ = run_ours(args, "memory_bank", args.batch)
    print(f"memory bank ({args.memory_bank} entries, batch {args.batch}): {bank:,.0f} samples/s")
    print(json.dumps({
        "device": device, "model": args.model, "batch": args.batch, "precision": args.precision,
        "compile_ours": bool(args.compile), "compile_open_clip": bool(args.compile),
        "trainer": "pipeline.stages.train.build_trainer (deterministic, gradient clipping as shipped)",
        "open_clip_compiled_samples_per_s": round(theirs_compiled, 1) if theirs_compiled else None,
        "ratio_compiled": round(compiled / theirs_compiled, 3) if compiled and theirs_compiled else None,
        "flops_per_sample": round(flops), "peak_tflops": args.peak_tflops, "mfu_ours": mfu["ours"],
        "mfu_ours_compiled": mfu["ours_compiled"],
        "ours_samples_per_s": round(ours, 1), "open_clip_samples_per_s": round(theirs, 1) if theirs else None,
        "ratio": round(ours / theirs, 3) if theirs else None,
        "grad_cache_effective_batch": args.grad_cache_batch, "grad_cache_samples_per_s": round(cached, 1),
        "grad_cache_peak_mem_gb": round(cached_peak, 2) if cached_peak else None,
        "memory_bank_samples_per_s": round(bank, 1),
        "ours_compiled_samples_per_s": round(compiled, 1) if compiled else None,
        "grad_cache_max_batch": big_batch, "grad_cache_max_batch_samples_per_s": round(big, 1),
        "grad_cache_max_batch_peak_mem_gb": round(big_peak, 2) if big_peak else None,
    }))


if __name__ == "__main__":
    main()
