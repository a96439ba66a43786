"""One function sizes the Djinn server for an experiment; the local runner and the operator both use it."""
from djinn_operator.manifests import server_command

from djinn.runners import experiment
from djinn.server.sizing import max_concurrent, sizing_flags
from djinn.spec import parse_spec


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_admission_covers_every_agent_the_spec_runs():
    assert max_concurrent(parse_spec({"agentCounts": [1, 2, 4]})) == 64
    assert max_concurrent(parse_spec({"agentCounts": [1, 100]})) == 200
    assert max_concurrent(parse_spec({"agentCounts": [1, 2], "djinnSweepCap": 512})) == 1024


def test_operator_and_local_runner_start_the_server_with_the_same_sizes(monkeypatch, tmp_path):
    spec = parse_spec({"agentCounts": [1, 8, 300], "cluster": {"gpu": False}})
    assert _flag(server_command(spec), "--max-concurrent") == "600"

    started = {}

    class Recorder:
        def __init__(self, *args, extra=None, **kwargs):
            started["extra"] = extra
            self.address = "127.0.0.1:1"

        def start(self):
            return self

    monkeypatch.setattr("djinn.runners.local_server.LocalServer", Recorder)
    experiment.Resources(spec, str(tmp_path)).server_address()
    assert started["extra"] == sizing_flags(spec) and _flag(started["extra"], "--max-concurrent") == "600"


def test_long_act_phases_keep_sessions_and_connections_alive():
    """An agent sleeping 30 min between Reason and Reflect must find its session and connection again."""
    assert sizing_flags(parse_spec({"sleepSeconds": 10})) == ["--max-concurrent", "64"]
    long = sizing_flags(parse_spec({"sleepSeconds": 1800}))
    assert _flag(long, "--session-ttl") == "3660" and _flag(long, "--idle-timeout") == "3660"
    assert _flag(server_command(parse_spec({"sleepSeconds": 1800})), "--session-ttl") == "3660"
