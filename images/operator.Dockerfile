# syntax=docker/dockerfile:1.7
# Operator image: slim Python, no torch. The project is installed with --no-deps and only the
# operator's runtime dependencies are installed, with the same specifiers as pyproject.toml's
# [project].dependencies (tests/deploy checks that they agree).
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/djinn-bench/djinn-operator:0.1.0 .

ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install "kopf>=1.44" "kubernetes>=30,<37" "aiohttp>=3.14.5" "boto3>=1.34" "pydantic>=2.6,<3" "pyyaml>=6"
WORKDIR /src
COPY . /src
RUN pip install --no-deps /src

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 djinn \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/djinn --shell /usr/sbin/nologin djinn
COPY --from=build /opt/venv /opt/venv
COPY configs /opt/djinn/configs
ENV PATH=/opt/venv/bin:$PATH \
    DJINN_CONFIG_DIR=/opt/djinn/configs \
    HOME=/home/djinn \
    PYTHONUNBUFFERED=1
WORKDIR /home/djinn
USER 10001:10001
ENTRYPOINT ["python", "-m", "djinn_operator"]
