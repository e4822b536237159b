#!/usr/bin/env bash
# The one-call GPU check (issue 13): on a machine with an NVIDIA GPU, from the repository root,
#   bash benchmarks/gpu_check.sh            # results in $OUT (default out/gpu)
# It installs what the machine lacks (the wheels benchmarks/gpu_wheels.sh put in .whl/, when
# present), then writes under $OUT: env.txt (GPU, driver, versions), gpu-tests.log (pytest -m gpu),
# engine_overhead.jsonl, gpu_trainer.jsonl, kl_memory.jsonl, data_batches.jsonl, and the
# benchmarks' stderr in errors.log. Each step has its own time box, about 8 minutes in all on an
# H200; a failing step does not stop the next one (the exit status says whether any failed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# deterministic cuBLAS needs its workspace fixed before the process's first matmul
export CUBLAS_WORKSPACE_CONFIG=:4096:8
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/kdlab-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/kdlab-site:$PWD"
else
  export PYTHONPATH="$PWD"
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'pydantic', pydantic.VERSION); \
print('device', torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1

status=0
timeout 240 "$PY" -m pytest -m gpu tests/gpu --confcutdir=tests/gpu -p no:cacheprovider -q -rA \
  >"$OUT/gpu-tests.log" 2>&1 || status=1
timeout 90 "$PY" benchmarks/engine_overhead.py --device cuda \
  >"$OUT/engine_overhead.jsonl" 2>>"$OUT/errors.log" || status=1
timeout 180 "$PY" benchmarks/gpu_trainer.py --device cuda \
  >"$OUT/gpu_trainer.jsonl" 2>>"$OUT/errors.log" || status=1
timeout 40 "$PY" benchmarks/kl_memory.py --device cuda \
  >"$OUT/kl_memory.jsonl" 2>>"$OUT/errors.log" || status=1
timeout 30 "$PY" benchmarks/data_batches.py --device cuda \
  >"$OUT/data_batches.jsonl" 2>>"$OUT/errors.log" || status=1
tail -n 3 "$OUT/gpu-tests.log"
exit "$status"
