#!/usr/bin/env bash
# One run on a lent GPU machine (16 cores): CUDA tests (CPU and GPU bytes equal), then thread scaling of
# dare_ties on that machine's CPU, profiled at 16 threads. Called as: bash benchmarks/device_check.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
fi
{ nproc; nvidia-smi -L; python3 -c "import torch,sys;print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"; } 2>&1 | tee "$OUT/env.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_golden.py tests/test_check.py 2>&1 \
  | tee "$OUT/cuda_tests.txt" | tail -25
timeout 170 python3 benchmarks/scaling.py --shape small --threads 2,16 --compile off,on --cache /tmp/bench \
  --profile "$OUT" 2>&1 | tee "$OUT/scaling.txt"
