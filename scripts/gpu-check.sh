#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and a CUDA build of torch (README, "Devices"),
#   1. name the GPU (torch.cuda.get_device_name, nvidia-smi),
#   2. run the tests marked `gpu` (greedy float32 equality on CUDA, a CPU + GPU chain, ...),
#   3. generate on the GPU (in-process chain, float32) with and without drafting and print tok/s;
#      GPU_CHECK_BENCH=1 also runs `dsdnode bench --quick --device cuda` (a local swarm on the GPU).
# Exits non-zero with one clear line where there is no GPU.
# Env: PY (python of the venv, default .venv/bin/python), MODEL (default smollm2-135m; it must be
# pulled already or pullable), TOKENS (default 64).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-smollm2-135m}
TOKENS=${TOKENS:-64}
[ -x "$PY" ] || { echo "gpu-check: $PY not found: run 'make install' or set PY=/path/to/python" >&2; exit 1; }

"$PY" - <<'EOF' || exit 1
import sys

import torch

if not torch.cuda.is_available():
    build = ("a CPU build" if torch.version.cuda is None else
             f"built for CUDA {torch.version.cuda} but sees no GPU: check the driver and CUDA_VISIBLE_DEVICES")
    sys.exit(f"gpu-check: FAILED: no CUDA device is available (torch {torch.__version__} is {build}); "
             "run this on a GPU machine with a CUDA build of torch (README, 'Devices')")
props = torch.cuda.get_device_properties(0)
print(f"gpu-check: device {torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), bfloat16: {torch.cuda.is_bf16_supported()}")
EOF
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader | sed 's/^/gpu-check: nvidia-smi: /'
fi

echo "gpu-check: the gpu tests"
"$PY" -m pytest -q -rs -m gpu

rate() {  # the tok/s of a `dsdnode generate` summary line on stderr
  grep -o '([0-9.]* tok/s)' "$1" | tail -1 | tr -d '()'
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prompt="Write a Python function that returns the n-th Fibonacci number."
for k in 4 0; do
  "$PY" -m dsdnode generate --local --hops 2 --device cuda --dtype float32 --model "$MODEL" --draft "$MODEL" \
    --k "$k" --max-new-tokens "$TOKENS" --stats "$prompt" >"$work/out-$k.txt" 2>"$work/err-$k.txt" \
    || { cat "$work/err-$k.txt" >&2; echo "gpu-check: FAILED: generate --k $k on cuda" >&2; exit 1; }
done
echo "gpu-check: $MODEL on cuda, float32, 2 in-process hops, $TOKENS tokens: DSD k=4 $(rate "$work/err-4.txt"), " \
     "autoregressive $(rate "$work/err-0.txt")"
cmp -s "$work/out-4.txt" "$work/out-0.txt" && echo "gpu-check: DSD and autoregressive texts are identical (float32 greedy)" \
  || { echo "gpu-check: FAILED: DSD and autoregressive texts differ in float32" >&2; exit 1; }

if [ "${GPU_CHECK_BENCH:-0}" = 1 ]; then
  "$PY" -m dsdnode bench --quick --device cuda --out "$work/bench" | tail -n +2
fi
echo "gpu-check: OK"
