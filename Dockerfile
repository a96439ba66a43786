# syntax=docker/dockerfile:1.7
# djinn-bench all-in-one image (CPU): the `djinn-bench` CLI (run, serve, decode, agents, analyze),
# the Djinn server on CPU, the Ray head/worker, the analysis, and the operator (`python -m djinn_operator`).
# It is the image the Helm chart uses by default (charts/djinn-bench, image.repository).
#
#   docker build -t ghcr.io/djinn-bench/djinn-bench:0.1.0 .
#
# GPU server image: images/server.Dockerfile; slim operator image: images/operator.Dockerfile.
# All images that join one Ray cluster must share PYTHON_IMAGE and RAY_VERSION: Ray refuses a
# client whose Python x.y.z or Ray version differs from the head's.

ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# CPU wheels of torch; the default PyPI torch wheel would pull in ~3 GB of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG RAY_VERSION=2.60.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY . /src
# The project with all of its [project].dependencies (pyproject.toml); torch is already satisfied.
RUN pip install "ray[default]==${RAY_VERSION}" /src

FROM ${PYTHON_IMAGE}
# wget: KubeRay's health probes of Ray head and worker pods run `wget` inside the container.
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
# 5555: Djinn control plane (HTTP /healthz), 5556: Djinn data plane.
EXPOSE 5555 5556
ENTRYPOINT ["djinn-bench"]
CMD ["--help"]
