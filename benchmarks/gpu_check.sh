#!/bin/bash
# Prove the GPU path on one machine in under 8 minutes, and write one JSON with what it found.
#
#   bash benchmarks/gpu_check.sh                   # writes benchmarks/results/gpu_check.json
#   GPU_CHECK_OUT=/tmp/g.json PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# With CUDA, in order (each part under its own time limit; a failed part does not stop the others):
#   cuda_tests   pytest -m cuda tests/     the test suite's CUDA tests (skipped elsewhere)
#   check        coe-dist check --config configs/paper/coe-2-4of64.yaml --nproc <GPUs>
#   megatron     benchmarks/megatron_layer.py   CoE layer vs megatron-core MoELayer at equal FLOPs
#   train_step   benchmarks/gpu_step.py         training-step tokens/s, MFU and peak memory (paper config)
# Exit code 1 if a part failed.
# Without CUDA it says so, runs the CPU parts (the check on configs/tiny.yaml; the benchmarks report that
# they need CUDA) and exits 0. GPU_CHECK_QUICK=1 keeps the CPU parts to a single-process check of the
# versions, kernels and disk items (the test suite runs the script that way).
# Environment: PYTHON (default python3), GPU_CHECK_OUT, GPU_CHECK_QUICK, TMPDIR.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-benchmarks/results/gpu_check.json}
quick=${GPU_CHECK_QUICK:-0}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
: >"$work/parts"

# part NAME SECONDS COMMAND...: run it under a time limit, record its exit code and duration.
part() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "gpu_check: [$name] $*"
  timeout "$limit" "$@"
  rc=$?
  echo "$name $rc $((SECONDS - t0))" >>"$work/parts"
  echo "gpu_check: [$name] exit $rc after $((SECONDS - t0)) s"
}

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') || gpus=0
if [ "$gpus" -gt 0 ]; then
  echo "gpu_check: $gpus CUDA device(s)"
  part cuda_tests 150 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/
  part check 240 "$PYTHON" -m coe_dist.cli check --config configs/paper/coe-2-4of64.yaml --nproc "$gpus" \
    --set "log.run_dir=$work/paper" --json "$work/check.json"
else
  echo "gpu_check: no CUDA device: running the CPU parts only (the GPU figures need a GPU)"
  if [ "$quick" = 1 ]; then
    part check 240 "$PYTHON" -m coe_dist.cli check --config configs/tiny.yaml --set moe.ep_size=1 \
      --items versions,kernels,disk --set "log.run_dir=$work/tiny" --json "$work/check.json"
  else
    part check 400 "$PYTHON" -m coe_dist.cli check --config configs/tiny.yaml --nproc 2 \
      --set "log.run_dir=$work/tiny" --json "$work/check.json"
  fi
fi
part megatron 90 "$PYTHON" benchmarks/megatron_layer.py --out "$work/megatron.json"
part train_step 120 "$PYTHON" benchmarks/gpu_step.py --out "$work/step.json"

"$PYTHON" - "$work" "$out" "$gpus" <<'EOF'
import json
import sys
from pathlib import Path

work, out, gpus = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
def read(name):
    path = work / name
    return json.loads(path.read_text()) if path.is_file() else None
parts = {}
for line in (work / "parts").read_text().splitlines():
    name, rc, seconds = line.split()
    parts[name] = {"exit_code": int(rc), "seconds": int(seconds)}
result = {"cuda": gpus > 0, "gpus": gpus, "parts": parts, "check": read("check.json"),
          "megatron_layer": read("megatron.json"), "train_step": read("step.json")}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=1) + "\n")
print(f"gpu_check: wrote {out}")
EOF

failed=$(awk '$2 != 0 {print $1}' "$work/parts" | tr '\n' ' ')
if [ "$gpus" -eq 0 ]; then
  echo "gpu_check: no CUDA: CPU parts done${failed:+ (failed: $failed)}; exit 0"
  exit 0
fi
if [ -n "$failed" ]; then
  echo "gpu_check: FAILED: $failed"
  exit 1
fi
echo "gpu_check: all parts passed"
