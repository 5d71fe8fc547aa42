#!/usr/bin/env bash
# GPU checks for a CUDA machine without network (the device tool's H100/H200): install without
# dependencies, run the whole suite (GPU tests included), then the decode and schedule benchmarks on cuda:0.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -n 8 tests 2>&1 | tail -25
python3 examples/bench_decode.py --dir /tmp/fiddlerc-bench --device cuda:0 --threads "${THREADS:-8}" --rounds 3
python3 examples/bench_schedule.py --dir /tmp/fiddlerc-bench --device cuda:0 --threads "${THREADS:-8}" --rounds 3
