"""Fixtures of the operator's end-to-end tests (the harness lives in kmock_cluster.py)."""
from __future__ import annotations

import asyncio

import boto3
import pytest
from moto.server import ThreadedMotoServer

from kmock_cluster import BUCKET, session


@pytest.fixture(scope="session")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(monkeypatch, s3_endpoint):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    return s3


@pytest.fixture
def e2e(aws, tmp_path, monkeypatch):
    """Call with an async scenario(h: Harness); runs it against a fresh emulator with a deadline."""
    def run(scenario, timeout: float = 55) -> None:
        asyncio.run(asyncio.wait_for(session(aws, tmp_path, monkeypatch, scenario), timeout))
    return run
