# mergebot as a GitHub container action: `uses: owner/repo@<sha>` builds this image and runs
# `mergebot action` in the checked-out workspace (/github/workspace), reading INPUT_* and GITHUB_*.
#
# torch from PyPI on linux/x86_64 is the CUDA build (it pulls the nvidia-* runtime wheels), so the image can
# merge on a GPU when the runner's Docker exposes one (self-hosted runner with the NVIDIA container runtime as
# Docker's default runtime; see examples/README-action.md). Without a GPU it merges on the CPU.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# git: the action diffs the pushed commits to find the changed configs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, from pyproject.toml alone: this layer (torch, GBs) is rebuilt only when they change.
COPY pyproject.toml /opt/mergebot/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/opt/mergebot/pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the source (the card templates in templates/ are installed as data files, found by bot/card.py).
COPY README.md /opt/mergebot/README.md
COPY templates /opt/mergebot/templates
COPY bot /opt/mergebot/bot
RUN pip install --no-cache-dir --no-deps /opt/mergebot \
    && mergebot --version

# No USER and no WORKDIR: GitHub runs container actions as root with the workspace as the working directory.
ENTRYPOINT ["mergebot", "action"]
