#!/usr/bin/env bash
# One run on a lent GPU machine (16 cores), each step under its own timeout, results under $OUT:
#   1. the CUDA and golden tests (every method gives the CPU's bytes on the GPU);
#   2. benchmarks/io_probe.py: read(), page faults on a map at 1-16 threads, map -> float32, stores into a map;
#   3. thread scaling of dare_ties (compiled and eager) and ties on the host CPU, small models, then a py-spy
#      profile at 16 threads (carry .whl with the py-spy wheel).
# Called from the repository root as: bash benchmarks/device_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/typings:$PWD
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
if ls .whl/py_spy-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/py_spy-*.whl && export PATH=/tmp/site/bin:$PATH
fi
{ date -u; nproc; uname -r; nvidia-smi -L; free -g | head -2
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available(), torch.get_num_threads())"
} 2>&1 | tee "$OUT/env.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/engine/test_cuda.py \
  tests/engine/test_golden.py 2>&1 | tee "$OUT/cuda_tests.txt" | tail -15
timeout "${PROBE_TIMEOUT:-90}" python3 benchmarks/io_probe.py --gib 1 --threads 1,4,16 2>&1 | tee "$OUT/io_probe.txt"
timeout "${SCALING_TIMEOUT:-150}" python3 benchmarks/scaling.py --shape small --threads 2,16 --compile off,on \
  --cache /tmp/bench --profile "$OUT" --profile-rate 25 --profile-timeout 60 2>&1 | tee "$OUT/scaling.txt"
timeout "${TIES_TIMEOUT:-60}" python3 benchmarks/scaling.py --shape small --threads 2,16 --compile off --method ties \
  --cache /tmp/bench 2>&1 | tee -a "$OUT/scaling.txt"
