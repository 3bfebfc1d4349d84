#!/usr/bin/env bash
# Thread scaling on a lent GPU machine's CPU (16 cores): dare_ties of three ~1.1B bf16 models at 2-16 threads and
# at libgomp's default idle spin and mergebot's (GOMP_SPINCOUNT 300000 vs 10000),
# compiled (warm cache after one warm-up run) and eager, then a py-spy profile at 16 threads (carry the py-spy
# wheel under .whl/). Called from the repository root as: bash benchmarks/device_scaling.sh   Results under $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/typings:$PWD
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/py_spy-*.whl && export PATH=/tmp/site/bin:$PATH
{ nproc; lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA node"; free -g | head -2
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.get_num_threads())"; } 2>&1 | tee "$OUT/env.txt"
timeout "${SCALING_TIMEOUT:-480}" python3 benchmarks/scaling.py --shape "${SHAPE:-1b}" --threads "${THREADS:-2,4,8,16}" --spins "${SPINS:-300000,10000}" \
  --compile "${MODES:-on,off}" --cache /tmp/bench --profile "$OUT" \
  --profile-rate "${PROFILE_RATE:-25}" --profile-timeout "${PROFILE_TIMEOUT:-90}" 2>&1 | tee "$OUT/scaling.txt"
