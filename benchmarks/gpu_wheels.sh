#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before benchmarks/gpu_check.sh on the GPU machine: downloads into
# .whl/ the wheels of the worker's dependencies that the GPU image lacks (pydantic and its own
# dependencies; torch, numpy, safetensors, scikit-learn, PyYAML and pytest are there already),
# for that machine's Python 3.12 on x86-64. .whl/ is git-ignored; the device call carries it.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for wheel in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$wheel"
done
ls -la .whl
