#!/usr/bin/env bash
# One run on a lent GPU machine: ~2.1B-parameter bf16 models, mergebot --device cuda beside mergekit 0.1.5 with
# its fastest single-GPU flags, against the I/O bound; then the CUDA tests. Results under $OUT.
# Called from the repository root as: bash benchmarks/gpu_bench.sh   (carry .whl: mergekit and its wheels)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
# mergebot from the source tree (typings/mergebot links to bot/), the wheels only where the machine lacks them
export PYTHONPATH=$PWD/typings:$PWD
need=()
for pair in mergekit:mergekit pydantic:pydantic pydantic_core:pydantic_core annotated_types:annotated_types \
            typing_inspection:typing_inspection immutables:immutables accelerate:accelerate peft:peft click:click \
            sentencepiece:sentencepiece scipy:scipy; do
  mod=${pair#*:}; whl=${pair%%:*}
  python3 -c "import $mod" 2>/dev/null || need+=(.whl/${whl}-*.whl)
done
if (( ${#need[@]} )); then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${need[@]}" \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site PATH=/tmp/site/bin:$PATH
fi
cat > /tmp/mergekit-yaml <<'PY'
#!/usr/bin/env python3
from mergekit.scripts.run_yaml import main
main()
PY
chmod +x /tmp/mergekit-yaml
{ nproc; nvidia-smi -L; python3 -c "import torch,sys;print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
  python3 -c "import mergekit; print('mergekit ok')"; } 2>&1 | tee "$OUT/env.txt"
timeout "${GPU_TIMEOUT:-330}" python3 benchmarks/bench_merge.py --shape 2b --cache /tmp/bench --device cuda --repeat 1 \
  --methods linear,dare_ties --mergekit /tmp/mergekit-yaml --mergekit-args "--cuda --read-to-gpu --low-cpu-memory" \
  --results "$OUT/gpu_results.json" 2>&1 | tee "$OUT/gpu_bench.txt"
timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/engine/test_cuda.py tests/engine/test_golden.py 2>&1 \
  | tee "$OUT/cuda_tests.txt" | tail -5
