"""One server config: sized from an experiment spec, started by the local runner and the operator alike,
and turned into flags that server_main parses back into the same config."""
import pytest
from djinn_operator.manifests import server_command

from djinn.runners import experiment
from djinn.server.config import ServerConfig
from djinn.server.server_main import build_parser, config_from_args
from djinn.server.sizing import max_concurrent, server_config
from djinn.spec import parse_spec


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def parsed(argv: list[str]) -> ServerConfig:
    return config_from_args(build_parser().parse_args(argv))


def test_admission_covers_every_agent_the_spec_runs():
    assert max_concurrent(parse_spec({"agentCounts": [1, 2, 4]})) == 64
    assert max_concurrent(parse_spec({"agentCounts": [1, 100]})) == 200
    assert max_concurrent(parse_spec({"agentCounts": [1, 2], "djinnSweepCap": 512})) == 1024


@pytest.mark.parametrize("config", [
    ServerConfig(device="cpu"),
    ServerConfig(device="cpu", host="0.0.0.0", insecure=True, control_port=None, max_frame=10_485, max_step_ms=40.5, kv_block_size=32,
                 host_kv_gb=1.5, allow_models=("a/b", "c/d"), model_id="djinn/tiny-llama", session_ttl_s=3660.0),
    ServerConfig(device="cpu", model_id="--insecure", allow_models=("-x",)),  # values that look like flags
    server_config(parse_spec({"device": "cpu", "sleepSeconds": 1800, "agentCounts": [1, 300]})),
])
def test_a_config_survives_its_flags(monkeypatch, config):
    monkeypatch.delenv("GENIE_QOS_MAX_CONCURRENCY", raising=False)
    assert parsed(config.to_argv()) == config


def test_tokens_travel_in_the_environment_never_on_the_command_line(monkeypatch):
    config = ServerConfig(device="cpu", auth_token="s3cret", admin_token="adm1n")
    assert "s3cret" not in " ".join(config.to_argv()) and "adm1n" not in " ".join(config.to_argv())
    monkeypatch.setenv("DJINN_AUTH_TOKEN", "s3cret")
    monkeypatch.setenv("DJINN_ADMIN_TOKEN", "adm1n")
    assert config.token_env() == {"DJINN_AUTH_TOKEN": "s3cret", "DJINN_ADMIN_TOKEN": "adm1n"}
    assert parsed(config.to_argv()) == config


def test_long_act_phases_keep_sessions_and_connections_alive():
    """An agent sleeping 30 min between Reason and Reflect must find its session and connection again."""
    short = server_config(parse_spec({"sleepSeconds": 10}))
    assert (short.session_ttl_s, short.idle_timeout_s) == (ServerConfig().session_ttl_s, ServerConfig().idle_timeout_s)
    long = server_config(parse_spec({"sleepSeconds": 1800}))
    assert long.session_ttl_s == long.idle_timeout_s == 3660


def test_operator_and_local_runner_start_the_same_server(monkeypatch, tmp_path):
    spec = parse_spec({"agentCounts": [1, 8, 300], "sleepSeconds": 1800, "cluster": {"gpu": False}})
    monkeypatch.setenv("DJINN_AUTH_TOKEN", "from-the-secret")  # what the pod's env gives it
    pod = parsed(server_command(spec)[3:])
    monkeypatch.delenv("DJINN_AUTH_TOKEN")
    started = {}

    class Recorder:
        def __init__(self, config, log_path=None):
            started["config"] = config
            self.address = "127.0.0.1:1"

        def start(self):
            return self

    monkeypatch.setattr("djinn.runners.local_server.LocalServer", Recorder)
    experiment.Resources(spec, str(tmp_path)).server_address()
    local = started["config"]
    assert local == server_config(spec)
    assert pod.max_concurrent == local.max_concurrent == 600 and pod.session_ttl_s == local.session_ttl_s == 3660
    assert (pod.model_id, pod.weights, pod.dtype) == (local.model_id, local.weights, local.dtype)
    assert (pod.host, pod.device, pod.shutdown_grace_s, pod.host_kv_gb) == ("0.0.0.0", "cpu", 30.0, 4.0)
