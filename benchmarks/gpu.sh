#!/bin/bash
# The device checks in one call, for a session that is lent the GPU machine (H200, Python 3.12, torch 2.11,
# no internet). Prepare here, where the registry is reachable:
#     bash ../shared/gpu/fetch-wheels.sh && python3 -m pip download -q --no-deps --only-binary=:all: \
#         --python-version 3.12 --platform any -d .whl liger-kernel==0.8.5
# then run on the device (carry .whl):
#     bash benchmarks/gpu.sh
# It installs the wheels, runs the gpu-marked tests, then the throughput benchmark, and prints both.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
python3 -c "import torch, composer, llmfoundry; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_loss.py -s 2>&1 | tail -30
python3 benchmarks/train_throughput.py --timeout 420 2>&1 | tail -30
