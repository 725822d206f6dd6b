#!/usr/bin/env bash
# Wheels for running tests/gpu/run_sharded.sh on a GPU machine that cannot reach PyPI: the package's dependencies
# that a PyTorch CUDA image usually lacks, `deepspeed` (an sdist on PyPI: built here into a pure-Python wheel; its
# CUDA ops compile on first use there) and the transformers / accelerate / peft versions this project is tested with.
#
#   bash tests/gpu/fetch_wheels.sh [DIR] [PYTHON_VERSION]      # defaults: .whl, 3.12
#
# There:  python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
#         PYTHONPATH=/tmp/site:src bash tests/gpu/run_sharded.sh sharded_runs
set -euo pipefail
DIR="${1:-.whl}"
PYV="${2:-3.12}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=()
for name in transformers accelerate peft datasets; do
  pins+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
  "${pins[@]}" evaluate av pycocotools dill multiprocess hjson pydantic pydantic-core annotated-types \
  typing-inspection
"$PY" -m pip wheel -q --no-deps "deepspeed==${DEEPSPEED_VERSION:-0.19.8}" -w "$DIR"
ls "$DIR"
du -sh "$DIR"
