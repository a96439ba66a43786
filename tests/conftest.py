"""Shared fixtures: a real Djinn server on loopback, a moto S3 server, the tiny models."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_LLAMA = "djinn/tiny-llama"
ADMIN_TOKEN = "admin-secret"  # the shared server's --admin-token (it has no client token: loopback)


@pytest.fixture(scope="session")
def tiny_llama():
    from djinn.models import load_model

    return load_model(TINY_LLAMA, weights="synthetic", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def djinn_server(tmp_path_factory):
    """A Djinn server process serving the tiny Llama on 127.0.0.1 (CPU)."""
    from djinn.runners.local_server import LocalServer
    from djinn.server.config import ServerConfig

    log = tmp_path_factory.mktemp("server") / "server.log"
    config = ServerConfig(model_id=TINY_LLAMA, weights="synthetic", device="cpu", admin_token=ADMIN_TOKEN)
    with LocalServer(config, log_path=str(log)) as server:
        server.log = log
        yield server


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 in server mode on 127.0.0.1, for real boto3 calls."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint):
    import uuid

    import boto3

    name = f"djinn-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def hf_greedy(model, tokens, n):
    """Reference: transformers' own generate, greedy, exactly ``n`` new tokens."""
    from djinn.runners.hf_agent import greedy

    return greedy(model, list(tokens), n)
