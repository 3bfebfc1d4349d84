#!/usr/bin/env bash
# The container action (issue 13): build the image from the unchanged Dockerfile and run it the way GitHub runs
# a Docker container action, on a machine without Docker or a registry (docs: shared/docs/container-here.md).
#
#   1. podman + runc + debootstrap (apt, when missing); podman settings from scripts/container/containers.conf.
#   2. A stand-in for the base image, made with debootstrap and tagged docker.io/library/python:3.11-slim-bookworm
#      (kept and reused: skipped when that image exists). The Dockerfile's digest-pinned BASE_IMAGE is overridden
#      with it, since a locally imported image has no registry digest.
#   3. The CPU image: TORCH_VERSION=<Dockerfile's>+cpu from a local wheel directory (bind-mounted) when one holds
#      it, else from PyTorch's CPU index; the CA bundle bind-mounted for pip. Layers are reused; the time and the
#      size are reported, and the image is checked to hold neither the CA bundle nor the wheel directory.
#   4. Runs, as the runner does (workspace at /github/workspace as the working directory, GITHUB_EVENT_PATH,
#      GITHUB_OUTPUT and GITHUB_STEP_SUMMARY in mounted folders, INPUT_* for every input):
#      a. `mergebot --version`; b. `mergebot demo` (--network none); c. a pull_request dry run (--network
#      none); d. a push that merges and publishes to the loopback Hub (tests/hubserver.py on 127.0.0.1,
#      --network host), checked against what the Hub then holds; e. the fused kernels compiled into the image
#      (WARM_METHODS, default dare_ties) run in a fresh container without compiling anything.
#
# Exits non-zero when anything fails. Needs root (rootful podman, debootstrap), git and python3 with PyYAML.
# Environment: MERGEBOT_IMAGE (default localhost/mergebot-action:cpu), TORCH_WHEELS (directory with the CPU
# torch wheel), PYTHON (default python3), KEEP_TMP=1 (keep the work directory for a look after a failure).
set -euo pipefail
cd "$(dirname "$0")/../.."

image=${MERGEBOT_IMAGE:-localhost/mergebot-action:cpu}
base=docker.io/library/python:3.11-slim-bookworm
py=${PYTHON:-python3}
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
[[ -n $torch_version ]] || { echo "test-image.sh: no ARG TORCH_VERSION in the Dockerfile" >&2; exit 1; }

t_start=$SECONDS
passed=()
say() { printf '\n== %s\n' "$*"; }
ok() { passed+=("$*"); printf '  ok: %s\n' "$*"; }
die() { printf 'test-image.sh: FAILED: %s\n' "$*" >&2; exit 1; }

((EUID == 0)) || die "run as root (rootful podman and debootstrap)"
"$py" -c 'import yaml' 2>/dev/null || die "$py has no PyYAML (pip install pyyaml): needed to read action.yml"

# ---------------------------------------------------------------------------------------------------- 1. tools
missing=()
for tool in podman runc debootstrap git; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if ((${#missing[@]})); then
    say "installing ${missing[*]} (apt)"
    t=$SECONDS
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap git >/dev/null
    echo "  installed in $((SECONDS - t)) s"
fi

tmp=$(mktemp -d /tmp/mergebot-container.XXXXXX)
containers=()
hub_pid=
cleanup() {
    local rc=$?
    for c in "${containers[@]}"; do podman rm -f -i "$c" >/dev/null 2>&1 || true; done
    [[ -z ${mnt:-} ]] || podman image unmount "$image" >/dev/null 2>&1 || true
    if [[ -n $hub_pid ]]; then kill "$hub_pid" 2>/dev/null || true; wait "$hub_pid" 2>/dev/null || true; fi
    if [[ ${KEEP_TMP:-} == 1 ]]; then echo "test-image.sh: work directory kept: $tmp"; else rm -rf "$tmp"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "test-image.sh: a command failed at line $LINENO" >&2' ERR

export CONTAINERS_CONF=$PWD/scripts/container/containers.conf  # runc, lower rlimits (see the file)
echo "podman $(podman version --format '{{.Client.Version}}'), runc $(runc --version | sed -n 's/^runc version //p')"

# ------------------------------------------------------------------------------------------- 2. base stand-in
# The official image has Python's C headers (Inductor's kernels include Python.h); an older stand-in without them
# is replaced.
has_headers='import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
if podman image exists "$base" && ! podman run --rm --network none "$base" python3 -c "$has_headers" 2>/dev/null; then
    echo "  the cached stand-in for $base lacks Python's headers: rebuilding it"
    podman rmi -f "$base" >/dev/null
fi
if podman image exists "$base"; then
    say "base: $base (local stand-in, cached)"
else
    say "base: building a stand-in for $base with debootstrap"
    t=$SECONDS
    mirror=http://deb.debian.org/debian
    if grep -qs '^ID=debian' /etc/os-release; then
        mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
        mirror=${mirror:-$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)}
        mirror=${mirror:-http://deb.debian.org/debian}
    fi
    rootfs=$tmp/rootfs
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,libpython3-dev bookworm "$rootfs" "$mirror" \
        > "$tmp/debootstrap.log" 2>&1 || { tail -n 30 "$tmp/debootstrap.log"; die "debootstrap"; }
    # Debian's python refuses `pip install` into the system (PEP 668); the official image has python/pip on PATH.
    chroot "$rootfs" python3 -m venv /usr/local/python
    # the official images' apt settings (no package caches kept in layers), and no apt lists in the base
    printf '%s\n' 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };' \
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };' \
        'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";' > "$rootfs/etc/apt/apt.conf.d/docker-clean"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$base" >/dev/null
    rm -rf "$rootfs"
    echo "  built in $((SECONDS - t)) s"
fi

# ------------------------------------------------------------------------------------------------ 3. the image
say "image: $image (CPU: torch==$torch_version+cpu)"
"$py" requirements/check_lock.py || die "requirements/runtime.lock does not match pyproject.toml"
# Warm kernels (Dockerfile): the release builds every fused method; CI compiles dare_ties only (about a minute
# on 2 cores, rebuilt with every source change) and checks below that a fresh container finds it compiled.
warm_methods=${WARM_METHODS:-dare_ties}
build_args=(--build-arg "BASE_IMAGE=$base" --build-arg "TORCH_VERSION=$torch_version+cpu"
            --build-arg "WARM_METHODS=$warm_methods")
# What pip needs at build time goes in one folder mounted over the base's (empty) /mnt, for the build only: a
# mount onto a path the base lacks would leave an empty stub file or folder in the layer.
pipmnt=$tmp/pip-build
mkdir -p "$pipmnt"
wheel=
for dir in ${TORCH_WHEELS:-} ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true) /opt/wheels; do
    dir=${dir#file://}
    wheel=$(compgen -G "$dir/torch-$torch_version+cpu-cp311-*.whl" | head -n1 || true)
    [[ -z $wheel ]] || break
done
if [[ -n $wheel ]]; then
    echo "  torch: $wheel (mounted for the build only)"
    mkdir -p "$pipmnt/wheels"
    ln "$wheel" "$pipmnt/wheels/" 2>/dev/null || cp "$wheel" "$pipmnt/wheels/"
    build_args+=(--build-arg PIP_FIND_LINKS=/mnt/wheels)
else
    echo "  torch: PyTorch's CPU index"
    build_args+=(--build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
fi
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
if [[ -f $ca ]]; then
    echo "  pip trusts $ca (mounted for the build only)"
    cp "$ca" "$pipmnt/ca.crt"
    build_args+=(--build-arg PIP_CERT=/mnt/ca.crt)
fi
mounts=(-v "$pipmnt:/mnt:ro")

old_id=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
t=$SECONDS
if ! podman build --network host --pull=never --layers "${mounts[@]}" "${build_args[@]}" -t "$image" . \
        > "$tmp/build.log" 2>&1; then
    tail -n 60 "$tmp/build.log"
    die "podman build"
fi
build_s=$((SECONDS - t))
grep -E '^(STEP [0-9]+/[0-9]+: (FROM|COPY|RUN)|--> Using cache)' "$tmp/build.log" | cut -c1-150 || true
new_id=$(podman image inspect --format '{{.Id}}' "$image")
size=$(podman image inspect --format '{{.Size}}' "$image")
size_h=$(numfmt --to=si --suffix=B "$size")
cached=$(grep -c -- '--> Using cache' "$tmp/build.log" || true)
ok "built in $build_s s ($cached steps from the layer cache), $size_h ($size bytes)"
if [[ -n $old_id && $old_id != "$new_id" ]]; then
    podman rmi "$old_id" >/dev/null 2>&1 && echo "  removed the previous image ${old_id:0:12}" || true
fi

# Nothing of the build's mounts in the image: not the CA bundle, not the wheels, not in the config or history.
env_json=$(podman image inspect --format '{{json .Config.Env}}' "$image")
[[ $env_json != *PIP_CERT* && $env_json != *PIP_FIND_LINKS* && $env_json != *PIP_EXTRA_INDEX_URL* ]] \
    || die "build-time pip settings ended up in the image's environment: $env_json"
history=$(podman history --no-trunc --format '{{.CreatedBy}}' "$image")
[[ $history != *"BEGIN CERTIFICATE"* ]] || die "a certificate is in the image history"
mnt=$(podman image mount "$image")
leftovers=$(find "$mnt/mnt" "$mnt/root/.cache" -mindepth 1 -maxdepth 1 2>/dev/null | sed "s#^$mnt##" || true)
torch_wheels=$(find "$mnt" -xdev -name 'torch-*.whl' 2>/dev/null | sed "s#^$mnt##" || true)
# Certificates the host's bundle adds to Debian's (a re-signing proxy's CA, say) must be in no file of the image.
foreign=$("$py" - "$ca" "$mnt" <<'PY'
import os, re, sys
pem = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")
norm = lambda b: re.sub(rb"\s", b"", b)
ca, mnt = sys.argv[1], sys.argv[2]
host = {norm(c) for c in pem.findall(open(ca, "rb").read())} if os.path.isfile(ca) else set()
debian = set()
for d, _, files in os.walk(os.path.join(mnt, "usr/share/ca-certificates")):
    for f in files:
        debian |= {norm(c) for c in pem.findall(open(os.path.join(d, f), "rb").read())}
extra = host - debian
hits = []
if extra:
    for d, dirs, files in os.walk(mnt):
        for f in files:
            p = os.path.join(d, f)
            if f.endswith((".crt", ".pem", ".cer")) and os.path.isfile(p) and not os.path.islink(p):
                if extra & {norm(c) for c in pem.findall(open(p, "rb").read())}:
                    hits.append(p[len(mnt):])
print(f"{len(extra)} extra certificate(s) in the host bundle; in the image: {', '.join(hits) or 'none'}")
sys.exit(1 if hits else 0)
PY
) || { podman image unmount "$image" >/dev/null; die "host CA certificates baked into the image: $foreign"; }
podman image unmount "$image" >/dev/null
mnt=
[[ -z $leftovers && -z $torch_wheels ]] || die "build files left in the image: $leftovers $torch_wheels"
ok "no build-time CA bundle, wheel directory or pip setting in the image ($foreign)"
podman run --rm --network none --entrypoint pip "$image" list --format=freeze > "$tmp/freeze.txt" 2>/dev/null \
    || die "pip list in the image"
"$py" requirements/check_lock.py --installed "$tmp/freeze.txt" >/dev/null || die "the image's packages are not the lock's"
ok "installed: the lock's $(grep -c '^[a-z0-9]' requirements/runtime.lock) hashed pins, $(grep -i '^torch==' "$tmp/freeze.txt"), mergebot $(sed -n 's/^mergebot==//p' "$tmp/freeze.txt")"

# ---------------------------------------------------------------------------------------------------- 4. runs
run_id=0
# gh_run NAME NETWORK EVENT PAYLOAD_JSON [ghaction.py env options...]: runs the action as the runner would;
# leaves $tmp/NAME/{log,output,summary} and sets $rc.
gh_run() {
    local name=$1 network=$2 event=$3 payload=$4 d=$tmp/$1
    shift 4
    run_id=$((run_id + 1))
    mkdir -p "$d/home" "$d/workflow" "$d/file_commands"
    printf '%s\n' "$payload" > "$d/workflow/event.json"
    for f in set_output step_summary set_env add_path save_state; do : > "$d/file_commands/${f}_$run_id"; done
    (umask 077 && "$py" scripts/container/ghaction.py env --event "$event" --run-id "$run_id" "$@" > "$d/env")
    containers+=("mergebot-ci-$$-$name")
    rc=0
    podman run --rm --name "mergebot-ci-$$-$name" --network "$network" --workdir /github/workspace \
        --env-file "$d/env" -v "$ws:/github/workspace" -v "$d/home:/github/home" \
        -v "$d/workflow:/github/workflow" -v "$d/file_commands:/github/file_commands" \
        "$image" > "$d/log" 2>&1 || rc=$?
    rm -f "$d/env"
    ln -s "file_commands/set_output_$run_id" "$d/output"
    ln -s "file_commands/step_summary_$run_id" "$d/summary"
}

say "a. mergebot --version"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
out=$(podman run --rm --network none --entrypoint mergebot "$image" --version 2>&1) || die "mergebot --version: $out"
[[ $out == *"$version"* ]] || die "mergebot --version said '$out', expected $version"
ok "mergebot --version: $out"

say "b. mergebot demo (--network none)"
mkdir -p "$tmp/demo"
t=$SECONDS
podman run --rm --network none -v "$tmp/demo:/github/workspace" --workdir /github/workspace \
    --entrypoint mergebot "$image" demo > "$tmp/demo.log" 2>&1 || { cat "$tmp/demo.log"; die "mergebot demo"; }
grep -q '^merged ' "$tmp/demo.log" || { cat "$tmp/demo.log"; die "mergebot demo printed no merge"; }
compgen -G "$tmp/demo/mergebot-demo/out/model*.safetensors" >/dev/null \
    || { cat "$tmp/demo.log"; find "$tmp/demo" | head -30; die "mergebot demo wrote no safetensors"; }
ok "mergebot demo offline in $((SECONDS - t)) s: $(grep '^merged ' "$tmp/demo.log" | cut -c1-110)"

say "workspace: tiny models (made by the image itself) and a git checkout"
ws=$tmp/ws
mkdir -p "$ws"
podman run --rm --network none -v "$ws:/github/workspace" --workdir /github/workspace --entrypoint python "$image" -c '
from pathlib import Path
from mergebot.tinymodels import make_family
for d in make_family(Path("models"), 3, seed=7, layers=2):
    (d / "README.md").write_text("---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# tiny parent\n")
    print(d)
' > "$tmp/models.log" 2>&1 || { cat "$tmp/models.log"; die "making the tiny models"; }
git_ws() { git -C "$ws" -c user.name=ci -c user.email=ci@example.com -c commit.gpgsign=false "$@"; }
git_ws init -q -b main
printf 'models/\n' > "$ws/.gitignore"
printf 'merges for the container test\n' > "$ws/README.md"
git_ws add -A && git_ws commit -q -m "start"
c1=$(git_ws rev-parse HEAD)
mkdir -p "$ws/merges"
cat > "$ws/merges/a.yml" <<'YAML'
models:
  - model: models/base
    parameters:
      weight: 0.5
  - model: models/ft1
    parameters:
      weight: 0.5
merge_method: linear
dtype: float32
YAML
git_ws add -A && git_ws commit -q -m "add merges/a.yml"
c2=$(git_ws rev-parse HEAD)
# the runner's checkout belongs to its user (1001), not to the container's root
chown -R 1001:1001 "$ws"
ok "workspace: models/{base,ft1,ft2} and merges/a.yml added in ${c2:0:12}"

say "c. pull_request: dry run (--network none)"
t=$SECONDS
gh_run pr none pull_request \
    "{\"pull_request\": {\"number\": 1, \"base\": {\"sha\": \"$c1\", \"ref\": \"main\"}, \"head\": {\"sha\": \"$c2\"}}}" \
    --input namespace=mergebot-ci --input mode=dry-run --input device=cpu \
    --env "GITHUB_SHA=$c2" --env GITHUB_REF=refs/pull/1/merge --env GITHUB_BASE_REF=main --env GITHUB_HEAD_REF=feature
"$py" scripts/container/ghaction.py check --label pull_request --log "$tmp/pr/log" --rc "$rc" \
    --output "$tmp/pr/output" --summary "$tmp/pr/summary" --status merges/a.yml=planned --count 1 \
    --repo merges/a.yml=mergebot-ci/a --summary-has "📝 planned" --summary-has "dry run"
ok "pull_request dry run in $((SECONDS - t)) s: merges/a.yml planned, nothing published"

say "d. push: merge and publish to the loopback Hub (--network host)"
FAKEHUB_TOKEN=hf_ci_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export FAKEHUB_TOKEN
FAKEHUB_TOKEN=$FAKEHUB_TOKEN "$py" scripts/container/fakehub.py --user mergebot-ci \
    --url-file "$tmp/hub.url" --state-file "$tmp/hub.json" > "$tmp/hub.log" 2>&1 &
hub_pid=$!
for _ in $(seq 100); do [[ -s $tmp/hub.url ]] && break; kill -0 "$hub_pid" 2>/dev/null || break; sleep 0.1; done
[[ -s $tmp/hub.url ]] || { cat "$tmp/hub.log"; die "the loopback Hub did not start"; }
hub_url=$(cat "$tmp/hub.url")
echo "  loopback Hub at $hub_url"
t=$SECONDS
gh_run push host push \
    "{\"ref\": \"refs/heads/main\", \"before\": \"$c1\", \"after\": \"$c2\", \"forced\": false}" \
    --input namespace=mergebot-ci --input-env hf_token=FAKEHUB_TOKEN --input device=cpu --env "GITHUB_SHA=$c2" \
    --env "HF_ENDPOINT=$hub_url" --env HF_HUB_DISABLE_XET=1 --env HF_HUB_OFFLINE=0 \
    --env NO_PROXY=127.0.0.1,localhost --env no_proxy=127.0.0.1,localhost
push_s=$((SECONDS - t))
kill "$hub_pid"
wait "$hub_pid" || { cat "$tmp/hub.log"; die "the loopback Hub failed"; }
hub_pid=
"$py" scripts/container/ghaction.py check --label push --log "$tmp/push/log" --rc "$rc" \
    --output "$tmp/push/output" --summary "$tmp/push/summary" --status merges/a.yml=published --count 1 \
    --repo merges/a.yml=mergebot-ci/a --summary-has "✅ published" --secret-env FAKEHUB_TOKEN \
    --hub-state "$tmp/hub.json" --hub-files model.safetensors README.md mergebot.lock.json mergekit_config.yml
ok "push in $push_s s: merges/a.yml merged and published to mergebot-ci/a on the loopback Hub"

say "e. warm kernels: a fresh container compiles nothing (--network none, $warm_methods, 3 threads)"
if [[ $warm_methods == none ]]; then
    echo "  skipped: WARM_METHODS=none"
else
    t=$SECONDS
    # with a thread count the build did not use: a kernel the image lacks is compiled (into the container's own
    # layer, gone after the run) and reported by --expect-warm
    podman run --rm --network none --entrypoint python "$image" -m mergebot.engine.warmup \
        --methods "$(cut -d, -f1 <<< "$warm_methods")" --expect-warm -j 3 > "$tmp/warm.log" 2>&1 \
        || { cat "$tmp/warm.log"; die "the image's kernels are not warm"; }
    ok "warm kernels in $((SECONDS - t)) s: $(tail -n1 "$tmp/warm.log" | cut -c1-110)"
fi

say "container action: all checks passed in $((SECONDS - t_start)) s"
printf '  - %s\n' "${passed[@]}"
echo "image: $image  size: $size_h  build: $build_s s"
