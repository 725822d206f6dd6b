#!/usr/bin/env bash
# GPU check of sharded training: `maskcma train` under accelerate FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3, with the
# configs docs/training.md shows (src/transformers_maskcma/configs/accelerate/), then `--resume`, then the checks of
# tests/gpu/sharded_check.py on the exported model and the logs. CPU runs cannot do this: accelerate enables FSDP
# only on GPU-like devices, and Trainer + DeepSpeed on CPU do not form a multi-process run (docs/training.md).
#
#   bash tests/gpu/run_sharded.sh [WORK_DIR]            # all runs; WORK_DIR defaults to sharded_runs
#   RUNS="zero3_lora" bash tests/gpu/run_sharded.sh     # a subset (fsdp_lora zero2_full zero3_lora zero3_full)
#
# Needs: CUDA GPUs (one process per GPU; NPROC overrides; with one GPU every engine runs its one-process path,
# which still partitions under ZeRO-3 and shards under FSDP2), the package installed (`pip install -e .`, or
# PYTHONPATH=src) and `deepspeed` for the ZeRO runs. On a machine without PyPI, bring the wheels that
# tests/gpu/fetch_wheels.sh downloads here (about 55 MB). Takes a few minutes per run on one GPU (tiny model, 6 steps). Exit code 0 when every
# run trained, resumed and passed the checks; the summary of each run is in WORK_DIR/summary.jsonl.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CONFIGS="$ROOT/src/transformers_maskcma/configs/accelerate"
PY="${PYTHON:-python3}"
WORK="$(mkdir -p "${1:-sharded_runs}" && cd "${1:-sharded_runs}" && pwd)"
NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
RUNS="${RUNS:-fsdp_lora zero2_full zero3_lora zero3_full}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$NPROC" -lt 1 ]; then
  echo "run_sharded.sh: no GPU found (nvidia-smi -L); set NPROC to the number of GPUs" >&2
  exit 2
fi
"$PY" "$HERE/sharded_check.py" prepare "$WORK" || exit 1
: > "$WORK/summary.jsonl"
failed=0

launch() {  # launch NAME YAML [--resume]
  local name="$1"; shift
  if [ "${name%%_*}" = fsdp ]; then
    "$PY" -m accelerate.commands.launch --config_file "$CONFIGS/fsdp.yaml" --num_processes "$NPROC" \
      --main_process_port "${PORT:-29517}" -m transformers_maskcma.cli train "$@"
  else  # DeepSpeed through the Trainer field `training.deepspeed` (the YAML names ds_zero2.json / ds_zero3.json)
    "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${PORT:-29517}" \
      -m transformers_maskcma.cli train "$@"
  fi
}

for name in $RUNS; do
  echo "=== $name: $NPROC process(es)"
  rm -rf "${WORK:?}/$name"
  if launch "$name" "$WORK/$name.yaml" > "$WORK/$name.log" 2>&1 \
     && launch "$name" "$WORK/${name}_resume.yaml" --resume > "$WORK/${name}_resume.log" 2>&1; then
    if "$PY" "$HERE/sharded_check.py" verify "$WORK" "$name" >> "$WORK/summary.jsonl"; then
      echo "$name: passed"
    else
      echo "$name: FAILED the checks"; failed=1
    fi
    tail -n 1 "$WORK/summary.jsonl"
  else
    echo "$name: FAILED to train (see $WORK/$name.log, ${name}_resume.log)"; tail -n 30 "$WORK/$name"*.log
    failed=1
  fi
done
exit $failed
