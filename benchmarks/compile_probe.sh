#!/usr/bin/env bash
# Why compiled kernels are slow on a many-core host: the same compiled dare_ties merge three times at 16 threads
# with one Inductor cache, counting the cache's files after each run (new files on a warm run = recompiled), the
# third under py-spy (Python frames: compiling shows as inductor/codecache frames, running as the kernels' callers).
# Called from the repository root as: bash benchmarks/compile_probe.sh   Results under $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/typings:$PWD TORCHINDUCTOR_CACHE_DIR=/tmp/ind OMP_NUM_THREADS=${THREADS:-16}
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/py_spy-*.whl 2>/dev/null && export PATH=/tmp/site/bin:$PATH
python3 -c "from benchmarks.bench_merge import make_models, CONFIGS; from pathlib import Path
b, a, c = make_models(Path('/tmp/bench'), 'small'); Path('/tmp/bench/d.yml').write_text(CONFIGS['dare_ties'].format(base=b, a=a, b=c))"
merge() { python3 -m mergebot.cli.main merge /tmp/bench/d.yml /tmp/bench/out-$1 --compile on --random-seed 1 --quiet 2>&1 | grep merged; }
for i in 1 2; do
  s=$(date +%s.%N); merge $i; e=$(date +%s.%N)
  echo "run $i: $(python3 -c "print(round($e-$s,1))") s wall, cache files: $(find /tmp/ind -type f | wc -l)"
done 2>&1 | tee "$OUT/compile_probe.txt"
timeout "${PROFILE_TIMEOUT:-60}" py-spy record --rate 50 --format raw -o "$OUT/pyspy-compiled.txt" -- \
  python3 -m mergebot.cli.main merge /tmp/bench/d.yml /tmp/bench/out-3 --compile on --random-seed 1 --quiet 2>&1 | tail -3
echo "after run 3: cache files $(find /tmp/ind -type f | wc -l)" | tee -a "$OUT/compile_probe.txt"
find /tmp/ind -type f -newer /tmp/bench/out-2 | head -20 | tee -a "$OUT/compile_probe.txt"
