#!/usr/bin/env bash
# Issue 13, item 4: the first merge in a fresh container against the same merge on a warm host.
#
# dare_ties of the three ~0.86B bf16 models of bench_methods.py (benchmarks/.cache/0.86b, made by it), page cache
# warm: on the host with a warm compile cache (one run to warm, then RUNS timed), then RUNS fresh containers of
# the image (--network none, the models mounted read-only, the output on the host disk as the host run's), each
# its first and only merge. Prints each wall time and the ratio of the best container run to the best host run.
#
# Needs the image built by scripts/container/test-image.sh (MERGEBOT_IMAGE, default localhost/mergebot-action:cpu)
# and root (rootful podman). Usage: bash benchmarks/bench_container.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-2}
image=${MERGEBOT_IMAGE:-localhost/mergebot-action:cpu}
models=benchmarks/.cache/0.86b
[[ -f $models/ft2/config.json ]] || python benchmarks/bench_methods.py --methods linear >/dev/null
tmp=$(mktemp -d /tmp/mergebot-bench-container.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
export CONTAINERS_CONF=$PWD/scripts/container/containers.conf

config() {  # config ROOT: dare_ties of ROOT/{base,ft1,ft2}
    printf 'models:\n  - model: %s/ft1\n    parameters: {weight: 0.5, density: 0.5}\n  - model: %s/ft2\n' "$1" "$1"
    printf '    parameters: {weight: 0.5, density: 0.5}\nmerge_method: dare_ties\nbase_model: %s/base\n' "$1"
}
config "$PWD/$models" > "$tmp/host.yml"
mkdir -p "$tmp/cfg"
config /models > "$tmp/cfg/dare.yml"
cat "$models"/*/*.safetensors > /dev/null  # page cache warm for both sides

best() { printf '%s\n' "$@" | sort -g | head -n1; }
host=()
python -m mergebot.cli.main merge "$tmp/host.yml" "$tmp/out" --random-seed 1 --quiet --force 2>/dev/null  # warm the cache
for _ in $(seq "$runs"); do
    rm -rf "$tmp/out"
    t=$(date +%s.%N)
    python -m mergebot.cli.main merge "$tmp/host.yml" "$tmp/out" --random-seed 1 --quiet 2>"$tmp/host.log"
    host+=("$(echo "$(date +%s.%N) - $t" | bc)")
done
ctr=()
for i in $(seq "$runs"); do
    t=$(date +%s.%N)
    rm -rf "$tmp/cout" && mkdir -p "$tmp/cout"
    podman run --rm --network none -v "$PWD/$models:/models:ro" -v "$tmp/cfg:/cfg:ro" -v "$tmp/cout:/out" \
        --entrypoint mergebot "$image" merge /cfg/dare.yml /out/o --random-seed 1 --quiet \
        > "$tmp/ctr$i.log" 2>&1 || { cat "$tmp/ctr$i.log"; exit 1; }
    ctr+=("$(echo "$(date +%s.%N) - $t" | bc)")
done
ctr_sum=$(cat "$tmp"/cout/o/*.safetensors | sha256sum | awk '{print $1}')
host_cat=$(cat "$tmp"/out/*.safetensors | sha256sum | awk '{print $1}')
printf 'host (warm cache):      %s s\n' "${host[*]}"
printf 'fresh container (each): %s s  (image %s)\n' "${ctr[*]}" "$image"
echo "ratio best container / best host: $(echo "scale=2; $(best "${ctr[@]}") / $(best "${host[@]}")" | bc)"
[[ $ctr_sum == "$host_cat" ]] && echo "output bytes: identical (sha256 ${host_cat:0:16})" \
    || echo "output bytes: DIFFER (host ${host_cat:0:16}, container ${ctr_sum:0:16})"
