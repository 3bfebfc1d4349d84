#!/usr/bin/env bash
# Where a GPU merge's time goes outside the merge loop: import and CUDA start-up timings, then a py-spy profile
# of one dare_ties run of ~2.1B bf16 models (carry .whl for py-spy). Results under $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/typings:$PWD
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/py_spy-*.whl && export PATH=/tmp/site/bin:$PATH
{
  for i in 1 2; do /usr/bin/time -f "import torch %e s" python3 -c "import torch"; done
  /usr/bin/time -f "import torch + cuda init %e s" python3 -c "import torch; torch.zeros(1, device='cuda')"
  /usr/bin/time -f "mergebot --version %e s" python3 -m mergebot.cli.main --version
} 2>&1 | tee "$OUT/startup.txt"
python3 - <<'PY'
import sys; sys.argv = ["x"]
sys.path.insert(0, ".")
from pathlib import Path
from benchmarks.bench_merge import make_models, CONFIGS
b, x, y = make_models(Path("/tmp/bench"), "2b")
Path("/tmp/dare.yml").write_text(CONFIGS["dare_ties"].format(base=b, a=x, b=y))
PY
cat /tmp/bench/2b/*/*.safetensors > /dev/null
timeout 150 py-spy record --idle -r 50 -f raw -o "$OUT/dare_gpu.txt" -- \
  python3 -m mergebot.cli.main merge /tmp/dare.yml /tmp/out-dare --device cuda --random-seed 1 2>&1 | tail -5
