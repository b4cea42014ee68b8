#!/bin/bash
# The CoE paper's comparison at the paper's scale on a Slurm cluster: every configs/paper/*.yaml x seed
# as one training job (GSM8K train for training, test for validation, GPT-NeoX tokenizer).
#
#   bash slurm/repro.sh --data DIR --tokenizer FILE [--seeds 1,2] [--nodes 1] [--gpus-per-node 8]
#                       [--partition P] [--time 04:00:00] [--configs a,b] [--out runs/paper-repro]
#                       [--container IMAGE] [--sbatch-arg ARG]... [--dry-run]
#
#   DIR        holds GSM8K's train.parquet and test.parquet (huggingface.co/datasets/openai/gsm8k, "main")
#   FILE       the GPT-NeoX tokenizer.json (huggingface.co/EleutherAI/gpt-neox-20b)
#
# 1. tokenizes both splits on this host, once (<out>/data/gsm8k-{train,test}.{bin,idx});
# 2. submits one job per config and seed with `coe-dist slurm submit` (slurm/train.sbatch: requeued before
#    its time limit, resumes from its last checkpoint); each run writes <out>/<config>-seed<S>/;
# 3. when they are done:  python benchmarks/repro.py --summarise <out> --out <out>/repro.md
#
# Global batch: configs/paper use micro_batch_size 8 x 8 GPUs = the paper's 64 sequences of 512 tokens;
# on another GPU count, add --set train.grad_accum=N so that micro x accum x GPUs stays 64.
# --dry-run prints the commands instead of running them. Run from the checkout with the venv active.
set -euo pipefail

die() { echo "slurm/repro.sh: $*" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data="" tokenizer="" seeds=1,2 nodes=1 gpus=8 partition="" time_limit="" configs="" out=runs/paper-repro
container="" dry_run=0 extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --data) data=${2:?--data needs a directory}; shift 2 ;;
    --tokenizer) tokenizer=${2:?--tokenizer needs a file}; shift 2 ;;
    --seeds) seeds=${2:?--seeds needs a list, e.g. 1,2}; shift 2 ;;
    --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
    --gpus-per-node) gpus=${2:?--gpus-per-node needs a number}; shift 2 ;;
    --partition) partition=${2:?--partition needs a name}; shift 2 ;;
    --time) time_limit=${2:?--time needs a limit, e.g. 04:00:00}; shift 2 ;;
    --configs) configs=${2:?--configs needs names, e.g. coe-2-4of64,moe-8of64}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --container) container=${2:?--container needs an image}; shift 2 ;;
    --sbatch-arg) extra+=("--sbatch-arg=${2:?--sbatch-arg needs an option}"); shift 2 ;;
    --sbatch-arg=*) extra+=("$1"); shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$data" ] || die "--data DIR is required: the directory with GSM8K's train.parquet and test.parquet"
[ -n "$tokenizer" ] || die "--tokenizer FILE is required: the GPT-NeoX tokenizer.json"
for split in train test; do
  [ -f "$data/$split.parquet" ] || die "--data $data: $data/$split.parquet does not exist (download GSM8K 'main')"
done
[ -f "$tokenizer" ] || die "--tokenizer $tokenizer: no such file"
[[ $seeds =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--seeds $seeds: expected numbers separated by commas, e.g. 1,2"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes $nodes: expected a whole number >= 1"
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node $gpus: expected a whole number >= 1"

names=()
if [ -n "$configs" ]; then
  IFS=, read -r -a names <<<"$configs"
else
  for f in "$here"/configs/paper/*.yaml; do names+=("$(basename "$f" .yaml)"); done
fi
for name in "${names[@]}"; do
  [ -f "$here/configs/paper/$name.yaml" ] || die "--configs: configs/paper/$name.yaml does not exist"
done

run() {  # print, and run unless --dry-run
  printf '%q ' "$@"
  echo
  if [ "$dry_run" = 0 ]; then "$@"; fi
}

prefix="$out/data/gsm8k"
for split in train test; do
  if [ ! -f "$prefix-$split.idx" ]; then
    run coe-dist preprocess --input "$data/$split.parquet" --tokenizer "$tokenizer" --output "$prefix-$split" \
        --fields question,answer --workers 4
  fi
done

submit=(--nodes "$nodes" --procs-per-node "$gpus" --gpus-per-node "$gpus")
[ -n "$partition" ] && submit+=(--partition "$partition")
[ -n "$time_limit" ] && submit+=(--time "$time_limit")
[ -n "$container" ] && submit+=(--container "$container")
for name in "${names[@]}"; do
  for seed in ${seeds//,/ }; do
    run coe-dist slurm submit --config "$here/configs/paper/$name.yaml" "${submit[@]}" "${extra[@]}" \
        --job-name "repro-$name-s$seed" \
        --set "train.seed=$seed" --set "log.run_dir=$out/$name-seed$seed" \
        --set "data.dataset=$prefix-train" --set "data.valid_dataset=$prefix-test" \
        --set "data.tokenizer=$tokenizer" --set "log.eval_interval=100" --set "log.eval_batches=16"
  done
done
echo "slurm/repro.sh: when the jobs are done: python benchmarks/repro.py --summarise $out --out $out/repro.md"
