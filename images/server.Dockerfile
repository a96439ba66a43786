# syntax=docker/dockerfile:1.7
# GPU Djinn server image (A100/H100): CUDA runtime base, torch built for CUDA 12.8, and the whole
# djinn-bench package (the same image serves as the Ray head of the Ray baselines on GPU nodes).
#
#   docker build -f images/server.Dockerfile -t ghcr.io/djinn-bench/djinn-bench-server:0.1.0 .
#   docker run --gpus all -p 5555:5555 -p 5556:5556 ghcr.io/djinn-bench/djinn-bench-server:0.1.0
#
# CPython comes from the same python image as the CPU images (Dockerfile, images/runner.Dockerfile)
# so that Ray's Python x.y.z check passes between this Ray head and the CPU clients. The CUDA
# base must therefore have a glibc at least as new as Debian bookworm's (2.36): Ubuntu 24.04.

ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS python

FROM ${CUDA_IMAGE} AS base
# Shared libraries the python image's CPython links against (ssl, ffi, sqlite, bz2, lzma,
# readline, uuid, expat, zlib), wget for KubeRay's probes, and a C compiler: Triton compiles its
# kernel launcher with cc against Python.h (from the python image's /usr/local/include) the first
# time a kernel runs, which the server does at model load (CUDA graph capture); without it the
# pod crash-loops.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates libssl3t64 libffi8 libsqlite3-0 libbz2-1.0 liblzma5 libreadline8t64 \
      libncursesw6 libuuid1 libexpat1 zlib1g tzdata wget gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY --from=python /usr/local /usr/local
RUN ldconfig && python3 --version

FROM base AS build
ARG TORCH_VERSION=2.11.0
# Official PyTorch wheel index for CUDA 12.8 (cu126 and cu130 exist too; match the driver).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG RAY_VERSION=2.60.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY . /src
RUN pip install "ray[default]==${RAY_VERSION}" /src

FROM base
RUN groupadd --system --gid 10001 djinn \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/djinn --shell /bin/bash djinn
COPY --from=build /opt/venv /opt/venv
COPY configs /opt/djinn/configs
ENV PATH=/opt/venv/bin:$PATH \
    DJINN_CONFIG_DIR=/opt/djinn/configs \
    HOME=/home/djinn \
    HF_HOME=/home/djinn/.cache/huggingface \
    PYTHONUNBUFFERED=1 \
    RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor \
    RAY_AUTH_MODE=disabled \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/djinn
USER 10001:10001
# 5555: control plane (HTTP /healthz), 5556: data plane.
EXPOSE 5555 5556
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:5555/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["python", "-m", "djinn.server.server_main"]
CMD ["--device", "cuda", "--gpu", "0", "--host", "0.0.0.0", "--port", "5556", "--control-port", "5555", "--max-concurrent", "64", "--max-vram-gb", "80", "--weights", "auto"]
