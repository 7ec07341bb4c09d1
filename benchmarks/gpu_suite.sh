#!/usr/bin/env bash
# The GPU suite (issue 31), one call on a lent H100/H200, in well under its 9 minutes:
#   1. training throughput of the shipped trainer (pipeline.stages.train.build_trainer) against
#      open_clip's own training script, like for like: eager vs eager and torch.compile vs
#      --torchcompile, ViT-B-32, batch 1024, bf16, with FLOPs per sample and MFU; grad cache at
#      32,768 and 65,536 effective batch (samples/s beside plain, peak memory); the memory bank
#      (benchmarks/bench_train.py);
#   2. catalog embedding of 800x800 JPEGs and exact search 180,000 x 10,000 with torch on the GPU
#      (benchmarks/bench_eval.py; decoding is the shipped path's, in CPU worker processes).
# Each benchmark's output goes to $OUT/<name>.log and its last line (one JSON object) to
# $OUT/<name>.json; the suite ends with one JSON line holding them all.
#
#   benchmarks/gpu_suite.sh           # on the GPU machine
#   benchmarks/gpu_suite.sh --smoke   # the same code on the CPU with tiny sizes (tests/test_benchmarks.py)
#
# A bare machine: what the benchmarks import and its Python lacks is installed first, from wheels
# in .whl/ when there are any (the device tool carries them), else from the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0
case "${1:-}" in
  "") ;;
  --smoke) smoke=1 ;;
  *) echo "usage: benchmarks/gpu_suite.sh [--smoke]" >&2; exit 2 ;;
esac
out=${OUT:-benchmarks/gpu-results}
mkdir -p "$out"
py=${PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONUNBUFFERED=1
if ! "$py" -c "import open_clip, lightning, polars, duckdb, faiss, safetensors, onnxruntime, open_clip_train" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  else
    "$py" -m pip install -q -e '.[bench]'
  fi
fi
"$py" - <<'PY'
import torch
print(f"suite: torch {torch.__version__}, CUDA {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), flush=True)
PY
# the device's dense bf16 peak for MFU (H100 and H200 SXM: 989 TFLOP/s); unknown devices get none
peak=$("$py" -c "import torch; n = torch.cuda.get_device_name() if torch.cuda.is_available() else ''; print(989 if ('H100' in n or 'H200' in n) else '')")

bench() {  # name, seconds allowed, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  # a benchmark that fails or runs out of time is recorded as such and the suite goes on (a lent
  # machine may not come back for a second try)
  timeout "$limit" "$py" "$@" 2>&1 | tee "$out/$name.log" || echo "{\"error\": \"exit ${PIPESTATUS[0]}\"}" >> "$out/$name.log"
  grep '^{' "$out/$name.log" | tail -n 1 > "$out/$name.json"
}

if (( smoke )); then
  bench train 600 benchmarks/bench_train.py --smoke
  bench eval 600 benchmarks/bench_eval.py --model ClickCLIP-Tiny --gallery 2000 --queries 200 --embed-sample 64 \
    --photos 16 --photo-batch 8
else
  bench train 360 benchmarks/bench_train.py --compile ${peak:+--peak-tflops "$peak"}
  bench eval 180 benchmarks/bench_eval.py --model ViT-B-32 --gallery 180000 --queries 10000 --embed-sample 2048 \
    --photos 2000 --photo-batch 256
fi
"$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(json.dumps({"suite": "gpu", **{name: json.loads((out / f"{name}.json").read_text()) for name in ("train", "eval")}}))
PY
