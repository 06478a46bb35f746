#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (no network there): the Triton kernel's
# tests on the GPU, its throughput against HBM bandwidth, and a short search with device: cuda.
#   bash bench/gpu_check.sh [OUT_DIR]
# A machine without network gets the Python packages it lacks as wheels in .whl/ (installed into
# /tmp/site), e.g. for Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
#       optuna cmaes colorlog alembic sqlalchemy mako greenlet pydantic pydantic-core \
#       annotated-types typing-inspection lm_eval==0.4.13 datasets evaluate dill multiprocess ...
# (the packages of `pip freeze` in .venv that the machine lacks; build sdist-only ones with
# `pip wheel --no-deps`). The demo pool (runs/demo-pool) must be built first.
set -u
out=${1:-/tmp/gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
which gcc cc
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_triton.py 2>&1 | tail -8
for dtype in float32 bfloat16 float16; do
    timeout 90 python3 bench/kernel.py --device cuda --dtype "$dtype" --torch-repeats 2 2>&1 | tail -6
done
timeout 90 python3 bench/kernel.py --device cuda --dtype bfloat16 --method ties --torch-repeats 2 2>&1 | tail -6
# The host tier on the GPU: pinned host-to-GPU bandwidth, a trial streamed through the staging
# buffer against it, and both tiers' bits compared (issue 29).
timeout 120 python3 bench/host_tier.py --device cuda --repeats 3 2>&1 | tail -12
# A search on the GPU: the demo config with device: cuda (kernel, live model and scoring there).
sed -e 's/^device: cpu/device: cuda/' -e 's/trials: 40/trials: 16/' configs/demo.yaml > configs/_gpu_demo.yaml
timeout 240 python3 -m evomerge search configs/_gpu_demo.yaml --run-dir "$out/gpu-run" 2>&1 | tail -5
timeout 120 python3 -m evomerge export "$out/gpu-run" "$out/gpu-run/best-merge" --force 2>&1 | tail -3
timeout 60 python3 -m evomerge report "$out/gpu-run" 2>&1 | head -30
rm -f configs/_gpu_demo.yaml
