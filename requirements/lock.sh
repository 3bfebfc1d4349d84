#!/usr/bin/env bash
# Regenerate requirements/runtime.lock: the image's Python dependencies (pyproject.toml [project] dependencies +
# requirements/runtime.in), every one pinned with its sha256 hashes, for `pip install --require-hashes`.
#
# torch is resolved (its own dependencies -- filelock, sympy, networkx, setuptools, ... -- land in the lock,
# hashed) but left out of the file: the CUDA build (PyPI) and the CPU build (PyTorch's CPU index, or a local
# wheel) of the same version are different files with different hashes and different dependencies, so the
# Dockerfile installs torch pinned by version (TORCH_VERSION) in a second step.
#
# Run after changing the dependencies in pyproject.toml or runtime.in (Python 3.11, Linux x86_64, like the
# image); TORCH_VERSION must match the Dockerfile's. Needs PyPI, plus the CPU torch wheel: from the directory in
# TORCH_FIND_LINKS (default /opt/wheels, when it holds it) or else from PyPI's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PIP_TOOLS_VERSION=7.6.2
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-/opt/wheels}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Only PyPI (and the CPU torch): no pip configuration of this machine (mirrors, extra indexes) leaks in.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "pip-tools==$PIP_TOOLS_VERSION"

torch_source=()
if compgen -G "$TORCH_FIND_LINKS/torch-$TORCH_VERSION+cpu-*.whl" >/dev/null; then
    torch_source=(--find-links "$TORCH_FIND_LINKS")
else
    torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
echo "torch==$TORCH_VERSION+cpu" > "$work/torch.txt"

# --unsafe-package torch: torch is resolved but written as a comment (this replaces the default unsafe set,
# so setuptools -- a torch dependency -- is pinned and hashed like the rest).
"$work/venv/bin/pip-compile" --quiet --resolver=backtracking --generate-hashes --strip-extras \
    --no-emit-index-url --no-emit-find-links --no-emit-trusted-host --unsafe-package torch \
    "${torch_source[@]}" --constraint "$work/torch.txt" \
    --output-file requirements/runtime.lock pyproject.toml requirements/runtime.in

# The header names the command line; keep it free of this machine's temp paths.
# pip-compile's closing note (torch "not pinned", "use --allow-unsafe") is replaced by what was meant.
python3 - "$work/torch.txt" <<'PY'
import re, sys
path = "requirements/runtime.lock"
text = open(path).read()
text = text.replace(sys.argv[1], "torch-cpu.txt")
text = re.sub(r"--find-links=\S+", "--find-links=CPU-TORCH-WHEEL-DIR", text)
text = re.sub(r"\n# WARNING: The following packages were not pinned.*\Z", "", text, flags=re.S).rstrip("\n")
text += ("\n\n# torch: resolved (its dependencies above are locked) but not listed; the Dockerfile installs the CUDA\n"
         "# or CPU build of TORCH_VERSION in a second step (see requirements/lock.sh).\n")
open(path, "w").write(text)
PY
grep -q '^torch==' requirements/runtime.lock && { echo "lock.sh: torch must not be in the lock" >&2; exit 1; }
echo "lock.sh: wrote requirements/runtime.lock ($(grep -c '^[a-z0-9]' requirements/runtime.lock) packages)"
