#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a GPU machine with PyTorch, transformers, peft and
# accelerate installed but nothing else of fedtune's: installs the wheels in .whl/ when there are
# any (bitsandbytes, pydantic, ... fetched beforehand on a machine with network access:
#   pip download --no-deps --only-binary=:all: -d .whl bitsandbytes pydantic pydantic-core ...;
# deepspeed is an sdist: `pip wheel --no-deps -w .whl deepspeed`, no compiler needed),
# puts src/ on the path and runs every check. The report goes to $OUT (default /tmp/gpu_check).
#
#   bash benchmarks/gpu_check.sh                 # every check
#   bash benchmarks/gpu_check.sh --only memory   # some of them
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fedtune-site .whl/*.whl || exit 1
    export PYTHONPATH="$PWD/src:/tmp/fedtune-site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec $PY benchmarks/gpu_check.py "$@"
