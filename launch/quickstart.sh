#!/usr/bin/env bash
# The main job: set up .venv, then pretrain the tiny CoE-2(2/8) model on the embedded arithmetic corpus
# with 2 processes and expert parallelism (ep_size 2) under DeepSpeed ZeRO-2. Extra arguments are passed
# to `coe-dist train`, e.g. --set train.steps=300.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# The demo's run directory holds only the demo: a second quickstart replaces the first one's run (a run dir
# belongs to one run; without --overwrite coe-dist refuses to mix them). With --resume it continues instead.
fresh=(--overwrite)
for arg in "$@"; do
    [[ "$arg" == --resume* ]] && fresh=()
done
exec .venv/bin/coe-dist train --config configs/tiny.yaml --nproc 2 --set moe.ep_size=2 "${fresh[@]}" "$@"
