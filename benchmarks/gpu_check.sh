#!/usr/bin/env bash
# GPU check: one short script, run from anywhere. About 3-4 minutes on an H100/H200 (an estimate: it has
# not run on a GPU yet); every section is capped by `timeout` (45 + 120 + 120 + 150 s, each plus 10 s to
# die), so even if every section hangs it ends within 8 minutes:
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine (PYTHON=... picks the interpreter)
#   DRY_RUN=1 bash benchmarks/gpu_check.sh    # tiny models on CPU, 2 CPU paths: the same code paths, ~1.5 min
#
# Sections (each one's failure or timeout is reported loudly, then the next one runs):
#   env    versions, device, bf16 support, which packages import (gpu_check.py env); nvidia-smi
#   vit    timm vit_base_patch16_224 (random init), 224 px, batch 128 + memory 128, bf16 autocast:
#          FIP continual step / fine-tune step time (goal <= 1.25; the paper reports ~1.4 on an RTX 2060),
#          FLOP ratio, g·v / gradient time, peak memory of each (bench_step.py --preset vit-b16)
#   bert   BERT-base (hf_bert from a bert-base BertConfig, random init), L = 128, batch 128 + memory 128,
#          random token ids, bf16 autocast: the same numbers (bench_step.py --preset bert-base)
#   paths  `fipray paths --config jobs/configs/ensemble_digits.yaml --smoke-test device=cuda
#          ray.gpus_per_path=0.25 ray.num_paths=4`: 4 FIP paths sharing one GPU on a local Ray (needs
#          ray and torchattacks importable); nvidia-smi's compute processes are sampled while it runs
#   report one table of all sections and the numbers (gpu_check.py report)
#
# Writes at most 5 files: gpu_check.txt (everything printed), vit.json, bert.json, paths_summary.json,
# summary.json, into $OUT when set, else benchmarks/results/gpu_check-<host>-<UTC time>/ (DRY_RUN: a
# folder under /tmp). Exit status: 0 when every section passed, else 1.
# Timeouts (seconds) can be changed with T_ENV, T_VIT, T_BERT, T_PATHS.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || echo python )}
DRY=${DRY_RUN:-0}
# The repository's own fipray first, installed or not (the GPU machine may have no `pip install -e .`).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
T_ENV=${T_ENV:-45} T_VIT=${T_VIT:-120} T_BERT=${T_BERT:-120} T_PATHS=${T_PATHS:-150}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
if [ -n "${OUT:-}" ]; then dir=$OUT
elif [ "$DRY" = 1 ]; then dir=/tmp/gpu_check-dry-$stamp
else dir=benchmarks/results/gpu_check-$(hostname)-$stamp; fi
mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check-work.XXXXXX")  # big outputs (the paths run) stay out of $dir
sections=$work/sections.tsv
: >"$sections"

# section NAME TIMEOUT_S COMMAND...: run it under `timeout`, record rc and seconds, never stop the script.
section() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo
  echo "=== [$name] $(date -u +%T) start (timeout ${limit}s): $*"
  # A function runs in a fresh bash (timeout needs a program); `timeout` kills its whole process group.
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$sections"
  if [ "$rc" -eq 0 ]; then
    echo "=== [$name] OK in $((SECONDS - t0)) s"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "!!!!!! [$name] TIMED OUT after $((SECONDS - t0)) s (limit ${limit}s, rc=$rc) -- continuing"
  else
    echo "!!!!!! [$name] FAILED rc=$rc after $((SECONDS - t0)) s -- continuing"
  fi
  return 0
}

env_section() {
  if [ "$DRY" = 1 ]; then
    "$PY" benchmarks/gpu_check.py env
  else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "(nvidia-smi failed)"
    "$PY" benchmarks/gpu_check.py env --require-cuda
  fi
}

# Model arguments (functions, not arrays, so that `timeout bash -c` sees them).
vit_args() {
  if [ "$DRY" = 1 ]; then  # the same preset, shrunk: 1 block, width 64, 32 px, patch 8; CPU, bf16 autocast
    printf '%s\n' --preset vit-b16 --device cpu --threads 1 --batch 4 --memory 4 --steps 2 --warmup 1 \
      --rounds 2 --input-shape 3,32,32 --model-kwargs '{"depth": 1, "embed_dim": 64, "num_heads": 2, "patch_size": 8}'
  else
    printf '%s\n' --preset vit-b16
  fi
}
bert_args() {
  if [ "$DRY" = 1 ]; then  # a 1-layer, width-64 BERT with a 1000-token vocabulary, L = 16
    printf '%s\n' --preset bert-base --device cpu --threads 1 --batch 4 --memory 4 --steps 2 --warmup 1 \
      --rounds 2 --input-shape 16 --model-kwargs '{"config": {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64}}'
  else
    printf '%s\n' --preset bert-base
  fi
}
bench_section() {  # bench_section vit|bert
  local -a a
  mapfile -t a < <("${1}_args")
  "$PY" benchmarks/bench_step.py "${a[@]}" --json-out "$dir/$1.json"
}

paths_section() {
  if ! "$PY" -c "import ray, torchattacks" 2>/dev/null; then
    echo "!!! ray and/or torchattacks do not import with $PY; this section needs them:"
    echo "!!!   pip install 'ray[tune,train,serve]==2.60.0' torchattacks   (or PYTHON=<an interpreter that has them>)"
    return 3
  fi
  local smi_pid="" rc
  if [ "$DRY" != 1 ] && command -v nvidia-smi >/dev/null; then
    # Evidence that the paths share the GPU: its compute processes every 5 s while the paths run.
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader -l 5 \
      >"$work/smi_apps.csv" 2>&1 &
    smi_pid=$!
  fi
  local -a over=(device=cuda ray.gpus_per_path=0.25 ray.num_paths=4)
  [ "$DRY" = 1 ] && over=(device=cpu ray.gpus_per_path=0 ray.num_paths=2 threads=1)
  echo "\$ $PY jobs/paths.py --config jobs/configs/ensemble_digits.yaml --smoke-test --no-progress --out $work/paths ${over[*]}"
  "$PY" jobs/paths.py --config jobs/configs/ensemble_digits.yaml --smoke-test --no-progress \
    --out "$work/paths" "${over[@]}"
  rc=$?
  if [ -n "$smi_pid" ]; then
    kill "$smi_pid" 2>/dev/null; wait "$smi_pid" 2>/dev/null
    echo "--- nvidia-smi compute processes during the run (pid, name, memory; sampled every 5 s):"
    sort -u "$work/smi_apps.csv" | head -40
  fi
  [ "$rc" -eq 0 ] || return "$rc"
  "$PY" benchmarks/gpu_check.py paths "$work/paths" --num-paths "${over[2]#ray.num_paths=}" \
    --json-out "$dir/paths_summary.json"
}

main() {
  echo "# gpu_check.sh $(date -u +%FT%TZ) on $(hostname); DRY_RUN=$DRY; python: $PY; out: $dir; work: $work"
  if git rev-parse --git-dir >/dev/null 2>&1; then
    echo "# git: $(git rev-parse --short HEAD), $(git status --porcelain | wc -l | tr -d ' ') changed file(s)"
  fi
  section env "$T_ENV" env_section
  section vit "$T_VIT" bench_section vit
  section bert "$T_BERT" bench_section bert
  section paths "$T_PATHS" paths_section
  echo
  echo "=== report"
  "$PY" benchmarks/gpu_check.py report "$dir" "$sections"
}

export PY DRY dir work
export -f env_section vit_args bert_args bench_section paths_section
main 2>&1 | tee "$dir/gpu_check.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] && rm -rf "$work"
exit "$rc"
