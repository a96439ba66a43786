# syntax=docker/dockerfile:1.7
# Client / runner + analysis image (CPU torch, Ray, matplotlib): runs the agent-scaling clients
# (`djinn-bench agents ...`), joins or heads a Ray cluster, and plots (`djinn-bench analyze`).
#
#   docker build -f images/runner.Dockerfile -t ghcr.io/djinn-bench/djinn-bench-runner:0.1.0 .
#
# Keep PYTHON_IMAGE and RAY_VERSION equal to images/server.Dockerfile's: Ray checks that the
# client and the head run the same Python and Ray versions.

ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG RAY_VERSION=2.60.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY . /src
RUN pip install "ray[default]==${RAY_VERSION}" /src

FROM ${PYTHON_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 djinn \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/djinn --shell /bin/bash djinn
COPY --from=build /opt/venv /opt/venv
COPY configs /opt/djinn/configs
ENV PATH=/opt/venv/bin:$PATH \
    RAY_AUTH_MODE=disabled \
    DJINN_CONFIG_DIR=/opt/djinn/configs \
    HOME=/home/djinn \
    HF_HOME=/home/djinn/.cache/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1 \
    RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor
WORKDIR /home/djinn
USER 10001:10001
ENTRYPOINT ["djinn-bench"]
CMD ["--help"]
