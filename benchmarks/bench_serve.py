"""Serving latency: one query at a time through the exported ONNX text encoder, on onnxruntime.

    python benchmarks/bench_serve.py

For the tiny model and ViT-B-32 (random weights: timing does not depend on them), the text tower
is exported as the promote stage exports it (`pipeline.training.onnx_export`), checked against PyTorch, and
timed on single queries, the tokens trimmed to the query's length as the exported graph expects.
ViT-B-32 is also timed at the full 77-token context, the plain export this replaces.
onnxruntime runs with 2 intra-op threads (the CI-class machine's cores). Tokenising is timed apart.
Last line: one JSON object {"models": [{model, context, p50_ms, p95_ms, parity_max_abs_diff}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.training.model import save_checkpoint, starting_model, trim_tokens  # noqa: E402
from pipeline.training.onnx_export import export_onnx  # noqa: E402

WORDS = ("navy", "red", "striped", "linen", "summer", "dress", "trainers", "mug", "ceramic", "lamp", "wool",
         "coat", "oak", "desk", "kids", "running", "shoes", "leather", "bag", "vintage")


def queries(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 6)))) for _ in range(n)]


def time_model(name: str, runs: int, full_context: bool) -> dict:
    import onnxruntime as ort

    bundle = starting_model(TrainConfig(model=name))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_checkpoint(bundle, Path(folder) / "ckpt")
        parity = export_onnx(checkpoint, Path(folder) / "onnx")["parity_max_abs_diff"]["text"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(str(Path(folder) / "onnx" / "text.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        texts = queries(runs)
        started = time.perf_counter()
        tokens = [bundle.tokenizer([t]) for t in texts]
        tokenize_ms = (time.perf_counter() - started) * 1000 / runs
        tokens = [t if full_context else trim_tokens(t) for t in tokens]
        for t in tokens[:20]:  # warm-up
            session.run(None, {"tokens": t.numpy()})
        latencies = []
        for t in tokens:
            started = time.perf_counter()
            session.run(None, {"tokens": t.numpy()})
            latencies.append((time.perf_counter() - started) * 1000)
    context = tokens[0].shape[1] if full_context else "trimmed"
    p50, p95 = statistics.median(latencies), float(np.percentile(latencies, 95))
    print(f"{name} (context {context}): p50 {p50:.2f} ms, p95 {p95:.2f} ms, tokenising {tokenize_ms:.3f} ms/query, "
          f"ONNX vs PyTorch max abs diff {parity:.1e}")
    return {"model": name, "context": context, "p50_ms": round(p50, 3), "p95_ms": round(p95, 3),
            "tokenize_ms": round(tokenize_ms, 3), "parity_max_abs_diff": parity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--models", default="ClickCLIP-Tiny,ViT-B-32")
    args = parser.parse_args()
    results = [time_model(name, args.runs, full_context=False) for name in args.models.split(",")]
    if "ViT-B-32" in args.models:
        results.append(time_model("ViT-B-32", args.runs, full_context=True))
    print(json.dumps({"models": results}))


if __name__ == "__main__":
    main()
