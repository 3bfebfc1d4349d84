# mergebot as a GitHub container action: `uses: owner/repo@<sha>` builds this image and runs
# `mergebot action` in the checked-out workspace (/github/workspace), reading INPUT_* and GITHUB_*.
#
# One Dockerfile, two images:
# - default build (what GitHub runs for `uses:`): torch from PyPI, which on linux/x86_64 is the CUDA build (it
#   pulls the CUDA runtime wheels), so the image can merge on a GPU when the runner's Docker exposes one
#   (self-hosted runner with the NVIDIA container runtime as Docker's default runtime; see
#   examples/README-action.md). Without a GPU it merges on the CPU.
# - CPU image for CPU runners (about 1/4 of the size): the CPU wheel of the same torch, e.g.
#     docker build --build-arg TORCH_VERSION=2.13.0+cpu \
#                  --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   `==2.13.0+cpu` matches only the CPU wheel (PyPI has no +cpu files), so such a build fails rather than
#   fetch CUDA. scripts/container/test-image.sh builds it from a local wheel directory instead
#   (PIP_FIND_LINKS, bind-mounted with `build -v`).
#
# Base image pinned by digest (the multi-platform index of python:3.11-slim-bookworm, Python 3.11.16). Bump it
# deliberately, with the digest from `docker buildx imagetools inspect python:3.11-slim-bookworm`.
# scripts/container/test-image.sh overrides it with a local stand-in (--build-arg BASE_IMAGE=...).
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# git: the action diffs the pushed commits to find the changed configs. g++: Inductor compiles the fused merge
# kernels with it (mergebot.engine.fuse); without one they run eagerly, 3-6x slower (issue 13).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates g++ \
    && rm -rf /var/lib/apt/lists/*

# Build args from here on, so that setting them leaves the layers above cached.
ARG TORCH_VERSION=2.13.0
# pip settings for this build only; unset by default, and an unset ARG is not exported to RUN, so the default
# build is plain PyPI. A CA bundle or wheel directory named here must be bind-mounted at build time (`build -v`),
# never COPY'd: nothing of it may end up in a layer. Build args are recorded in the image history: never pass
# credentials (e.g. in an index URL) this way.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT

# Dependencies first, from the lock file alone: this layer (torch, GBs) is rebuilt only when they change, not
# when the source does.
# 1. requirements/runtime.lock: every dependency but torch (torch's own included), exact versions and sha256
#    hashes, wheels only, from the index alone (extra indexes, find-links and constraints are for torch).
# 2. torch, pinned by version: the CUDA and CPU builds are different files (and the CUDA one has more
#    dependencies), so they cannot share one hashed lock; see requirements/lock.sh.
COPY requirements/runtime.lock /opt/mergebot/requirements/runtime.lock
RUN env -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS -u PIP_CONSTRAINT \
        pip install --no-cache-dir --require-hashes --only-binary=:all: \
        -r /opt/mergebot/requirements/runtime.lock \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && pip check

# Then the source (the card templates in templates/ are installed as data files, found by bot/card.py). Not
# editable, no dependencies, and built with the locked setuptools (no build isolation: nothing fetched here).
COPY pyproject.toml README.md /opt/mergebot/
COPY templates /opt/mergebot/templates
COPY bot /opt/mergebot/bot
RUN pip install --no-cache-dir --no-deps --no-build-isolation /opt/mergebot \
    && rm -rf /opt/mergebot/build /opt/mergebot/mergebot.egg-info \
    && mergebot --version

# Warm kernels: every Action run is a fresh container, where compiling the fused kernels would cost 15-60 s per
# method. They are compiled here, once, into the image (mergebot.engine.warmup merges small synthetic parents
# with each method): dynamic shapes and a run-time thread count make them serve any model and core count, and
# MERGEBOT_PORTABLE_KERNELS builds them for x86-64-v2 with AVX2 vectors, so they run on any x86 runner (the
# build machine's -march=native could crash elsewhere). WARM_METHODS: all (default), a comma-separated list,
# or none; WARM_DTYPES: the parents' dtypes to warm (bf16 is what published models use). Inductor also keeps
# its precompiled torch header in /tmp/torchinductor_root (root: how GitHub runs container actions), outside the
# cache dir: it stays in the image too, else each fresh container spends seconds rebuilding it.
ENV TORCHINDUCTOR_CACHE_DIR=/opt/mergebot/kernels \
    MERGEBOT_PORTABLE_KERNELS=1
ARG WARM_METHODS=all
ARG WARM_DTYPES=bfloat16
RUN if [ "$WARM_METHODS" != none ]; then \
        python -m mergebot.engine.warmup --methods "$WARM_METHODS" --dtypes "$WARM_DTYPES"; \
    fi

# No USER and no WORKDIR: GitHub runs container actions as root with the workspace as the working directory.
ENTRYPOINT ["mergebot", "action"]
