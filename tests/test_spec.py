import subprocess
import sys
from pathlib import Path

import pytest

from djinn.cli import EMBEDDED_DEFAULT, main
from djinn.spec import Baseline, SpecError, load_spec_file, parse_document, parse_quantity, parse_spec, to_document

ROOT = Path(__file__).resolve().parent.parent


def test_examples_are_valid_and_round_trip():
    for path in (ROOT / "examples").glob("*.yaml"):
        name, spec = load_spec_file(path)
        again = parse_document(to_document(name, spec))
        assert again == (name, spec)
    _, paper = load_spec_file(ROOT / "examples/experiment.yaml")
    assert paper.model_id == "meta-llama/Llama-2-7b-hf" and paper.agent_counts == [1, 2, 4, 8, 16, 32]
    assert paper.output.is_s3 and Baseline.ray_keepalive in paper.baselines


def test_embedded_default_is_valid_and_small():
    spec = parse_spec(EMBEDDED_DEFAULT)
    assert spec.model_id == "sshleifer/tiny-gpt2" and max(spec.agent_counts) <= 8
    assert spec.emulated_device_bytes == 2**20


@pytest.mark.parametrize("patch, field", [
    ({"agentCounts": [1, -2]}, "spec.agentCounts"),
    ({"agentCounts": []}, "spec.agentCounts"),
    ({"baselines": ["ray_keepalive", "magic"]}, "spec.baselines.1"),
    ({"newTokens": 0}, "spec.newTokens"),
    ({"sleepSeconds": -1}, "spec.sleepSeconds"),
    ({"output": {"uri": ""}}, "spec.output.uri"),
    ({"output": {"uri": "s3://"}}, "spec.output.uri"),
    ({"output": {"uri": "gs://b/p"}}, "spec.output.uri"),
    ({"emulatedDeviceMemory": "lots"}, "spec.emulatedDeviceMemory"),
    ({"djinnServer": "nohost"}, "spec.djinnServer"),
    ({"agentCount": [1]}, "spec.agentCount"),
    ({"cluster": {"backoffLimit": -1}}, "spec.cluster.backoffLimit"),
])
def test_bad_specs_fail_with_one_line_naming_the_field(patch, field):
    with pytest.raises(SpecError) as err:
        parse_spec(dict(EMBEDDED_DEFAULT, **patch))
    msg = str(err.value)
    assert msg.startswith(field + ":") and "\n" not in msg


def test_document_kind_and_version_are_checked():
    with pytest.raises(SpecError, match="^kind:"):
        parse_document({"apiVersion": "djinn.io/v1alpha1", "kind": "Pod", "spec": {}})
    with pytest.raises(SpecError, match="^apiVersion:"):
        parse_document({"apiVersion": "djinn.io/v2", "kind": "AgentScalingExperiment", "spec": {}})


def test_quantities():
    assert parse_quantity("1Mi") == 2**20 and parse_quantity("80G") == 80 * 10**9
    assert parse_quantity("1.5Ki") == 1536
    with pytest.raises(ValueError):
        parse_quantity("-1Gi")


def test_cli_rejects_bad_spec_with_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: djinn.io/v1alpha1\nkind: AgentScalingExperiment\nmetadata: {name: x}\n"
                   "spec:\n  agentCounts: [0]\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "djinn-bench: spec.agentCounts: agent counts must be >= 1, got 0"
    assert main(["run", "--spec-json", "{not json"]) == 2
    assert "--spec-json" in capsys.readouterr().err
    assert main(["run", "--agent-counts", "1", "--baselines", "nope", "--output-dir", str(tmp_path / "o")]) == 2
    assert "spec.baselines.0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "djinn.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("run", "agents", "decode", "serve", "analyze", "validate"):
        assert cmd in out
