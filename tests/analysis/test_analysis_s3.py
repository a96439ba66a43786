"""analyze() against a real S3 API (moto server on 127.0.0.1) through boto3."""
import json

import boto3
import pytest
from moto.server import ThreadedMotoServer

from analysis_testdata import decode_docs, scaling_docs
from djinn.results import result_key
from djinn_analysis import analyze
from djinn_analysis.__main__ import main


@pytest.fixture
def s3_endpoint(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_analyze_reads_and_writes_s3(s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="bench")
    for d in scaling_docs() + decode_docs():
        s3.put_object(Bucket="bench", Key="exp1/" + result_key(d.baseline, d.n_agents),
                      Body=d.model_dump_json().encode())
    s3.put_object(Bucket="bench", Key="exp1/results/djinn_agents/garbage.json", Body=b"\x00\x01")

    out = analyze("s3://bench/exp1", endpoint_url=s3_endpoint)
    assert out["figure6.png"] == "s3://bench/exp1/analysis/figure6.png"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="bench", Prefix="exp1/analysis/")["Contents"]}
    assert keys == {f"exp1/analysis/{n}" for n in ("results.csv", "table2.md", "table2.csv", "figure6.png",
                                                   "figure6.pdf", "claims.json", "decode_modes.png")}
    png = s3.get_object(Bucket="bench", Key="exp1/analysis/figure6.png")["Body"].read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    claims = json.loads(s3.get_object(Bucket="bench", Key="exp1/analysis/claims.json")["Body"].read())
    assert claims["skipped_files"] == ["results/djinn_agents/garbage.json"]
    density = {c["id"]: c for c in claims["claims"]}["tenant_density"]
    assert density["status"] == "N/A" and density["inputs"]["density_lower_bound"] == 4.0  # Djinn capped at 8
    md = s3.get_object(Bucket="bench", Key="exp1/analysis/table2.md")["Body"].read().decode()
    assert "| Ray Keep-Alive | 1, 2, 4 | 2 | N=4 (OOM) | 4 |" in md


def test_cli_s3_errors(s3_endpoint, capsys):
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="empty")
    assert main(["--input", "s3://empty/run", "--endpoint-url", s3_endpoint]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: input: no result documents under s3://empty/run; run the experiment first"
    assert main(["--input", "s3://no-such-bucket/x", "--endpoint-url", s3_endpoint]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: input: cannot list s3://no-such-bucket/x:") and "\n" not in err
