from pathlib import Path

import pytest

from djinn.cli import EMBEDDED_DEFAULT, main
from djinn.spec import Baseline, SpecError, load_spec_file, parse_document, parse_quantity, parse_spec, to_document

ROOT = Path(__file__).resolve().parent.parent


def _envsubst(path: Path, tmp_path: Path) -> Path:
    """An example as its header's ``envsubst`` fills it in (docs/kubernetes.md)."""
    filled = tmp_path / path.name
    filled.write_text(path.read_text().replace("${BUCKET}", "my-djinn-results").replace("${AWS_REGION}", "us-east-1"))
    return filled


def test_examples_are_valid_and_round_trip(tmp_path):
    for path in (ROOT / "examples").glob("*.yaml"):
        name, spec = load_spec_file(_envsubst(path, tmp_path))
        again = parse_document(to_document(name, spec))
        assert again == (name, spec)
    _, paper = load_spec_file(tmp_path / "experiment.yaml")
    assert paper.model_id == "meta-llama/Llama-2-7b-hf" and paper.agent_counts == [1, 2, 4, 8, 16, 32]
    assert paper.output.is_s3 and paper.output.region == "us-east-1" and Baseline.ray_keepalive in paper.baselines
    with pytest.raises(SpecError, match=r"^spec.output.region: '\$\{AWS_REGION\}' is not a region name"):
        load_spec_file(ROOT / "examples/experiment.yaml")  # not filled in: refused before anything runs


def test_embedded_default_is_valid_and_small():
    spec = parse_spec(EMBEDDED_DEFAULT)
    assert spec.model_id == "sshleifer/tiny-gpt2" and max(spec.agent_counts) <= 8
    assert spec.emulated_device_bytes == 2**20


@pytest.mark.parametrize("patch, field", [
    ({"agentCounts": [1, -2]}, "spec.agentCounts"),
    ({"agentCounts": []}, "spec.agentCounts"),
    ({"baselines": ["ray_keepalive", "magic"]}, "spec.baselines[1]"),
    ({"newTokens": 0}, "spec.newTokens"),
    ({"sleepSeconds": -1}, "spec.sleepSeconds"),
    ({"output": {"uri": ""}}, "spec.output.uri"),
    ({"output": {"uri": "s3://"}}, "spec.output.uri"),
    ({"output": {"uri": "gs://b/p"}}, "spec.output.uri"),
    ({"emulatedDeviceMemory": "lots"}, "spec.emulatedDeviceMemory"),
    ({"djinnServer": "nohost"}, "spec.djinnServer"),
    ({"agentCount": [1]}, "spec.agentCount"),
    ({"cluster": {"backoffLimit": -1}}, "spec.cluster.backoffLimit"),
    # bounds the CRD states, and rules the API server would apply to the pods
    ({"sleepSeconds": 1e9}, "spec.sleepSeconds"),
    ({"agentCounts": [1, 1000000]}, "spec.agentCounts"),
    ({"iterations": 10**6}, "spec.iterations"),
    ({"djinnSweepCap": 10**6}, "spec.djinnSweepCap"),
    ({"rayAddress": "garbage"}, "spec.rayAddress"),
    ({"output": {"uri": "s3://b/p", "endpointUrl": "minio:9000"}}, "spec.output.endpointUrl"),
    ({"cluster": {"tolerations": [{"operator": "Equal", "value": "x"}]}}, "spec.cluster.tolerations[0]"),
    ({"cluster": {"tolerations": [{"key": "k", "operator": "Exists", "value": "x"}]}}, "spec.cluster.tolerations[0]"),
    ({"cluster": {"tolerations": [{"key": "bad key", "operator": "Exists"}]}}, "spec.cluster.tolerations[0]"),
    ({"cluster": {"nodeSelector": {"gpu": "a100!"}}}, "spec.cluster.nodeSelector"),
    ({"cluster": {"serverCpu": "lots"}}, "spec.cluster.serverCpu"),
    ({"cluster": {"clientMemory": "2 GB"}}, "spec.cluster.clientMemory"),
    ({"cluster": {"queueName": "Team_A"}}, "spec.cluster.queueName"),
    ({"cluster": {"imagePullSecrets": ["Bad Secret"]}}, "spec.cluster.imagePullSecrets"),
    ({"cluster": {"serverReadyDeadlineSeconds": 0}}, "spec.cluster.serverReadyDeadlineSeconds"),
    ({"agentCounts": list(range(1, 66))}, "spec.agentCounts"),  # the status holds one entry per run
    ({"output": {"uri": "s3://b/" + "p" * 600}}, "spec.output.uri"),
    ({"output": {"uri": "s3://b/p", "region": "us east 1"}}, "spec.output.region"),
    ({"cluster": {"image": ""}}, "spec.cluster.image"),
    ({"cluster": {"image": " djinn-bench:test"}}, "spec.cluster.image"),
    ({"cluster": {"serverImage": "Djinn/Server:1"}}, "spec.cluster.serverImage"),
    ({"cluster": {"rayImage": "rayproject/ray:2.40 "}}, "spec.cluster.rayImage"),
    ({"cluster": {"serviceAccountName": "Bad Name!"}}, "spec.cluster.serviceAccountName"),
    ({"cluster": {"credentialsSecret": "Bad_Secret"}}, "spec.cluster.credentialsSecret"),
    # what cannot be a field name is quoted, and a long one cut: still one line
    ({"bad\nfield": 1}, "spec['bad\\nfield']"),
    ({"x" * 3000: 1}, "spec." + "x" * 292 + "..."),
    ({"prompt": "hi", "promptFile": "p.txt"}, "spec"),
])
def test_bad_specs_fail_with_one_line_naming_the_field(patch, field):
    with pytest.raises(SpecError) as err:
        parse_spec(dict(EMBEDDED_DEFAULT, **patch))
    msg = str(err.value)
    assert (msg == field or msg.startswith(field + ":")) and "\n" not in msg and len(msg) <= 300


def test_addresses_and_tolerations_the_api_server_takes_are_accepted():
    spec = parse_spec(dict(EMBEDDED_DEFAULT, rayAddress="ray://head-svc.ns.svc:10001", cluster={
        "tolerations": [{"operator": "Exists"}, {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present",
                                                 "effect": "NoSchedule"}],
        "nodeSelector": {"node.kubernetes.io/instance-type": "p4d.24xlarge"}, "serverCpu": "500m"}))
    assert spec.cluster.tolerations[0].key is None and spec.cluster.server_cpu == "500m"
    for address in ("auto", "head:6379"):
        assert parse_spec(dict(EMBEDDED_DEFAULT, rayAddress=address)).ray_address == address


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
    assert err == "djinn-bench: spec.agentCounts: agent counts must be between 1 and 4096, got 0"
    assert main(["run", "--spec-json", "{not json"]) == 2
    assert "--spec-json" in capsys.readouterr().err
    assert main(["run", "--agent-counts", "1", "--baselines", "nope", "--output-dir", str(tmp_path / "o")]) == 2
    assert "spec.baselines[0]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_subcommands_dispatch_and_their_flags_reach_the_spec():
    from djinn import cli

    p = cli.build_parser()
    args = p.parse_args(["agents", "--baseline", "ray_keepalive", "--agent-counts", "3", "1", "--min-steps", "100",
                         "--djinn-sweep-cap", "64", "--no-stop-on-oom", "--output-dir", "s3://b/p"])
    assert args.func is cli.cmd_agents
    _, spec = cli.resolve_spec(args)
    assert spec.agent_counts == [1, 3] and spec.min_steps == 100 and spec.djinn_sweep_cap == 64
    assert spec.stop_on_oom is False and spec.output.uri == "s3://b/p"
    assert spec.emulated_device_memory is None  # agents/decode start from the paper's settings, not the demo
    # the example's own local line: a local --output-dir replaces the whole output, S3 region and all
    _, spec = cli.resolve_spec(p.parse_args(["run", str(ROOT / "examples/experiment.yaml"), "--output-dir", "out"]))
    assert spec.output.uri == "out" and spec.output.region is None
    for argv, func in ((["run"], cli.cmd_run), (["decode"], cli.cmd_decode), (["validate", "x.yaml"], cli.cmd_validate),
                       (["analyze", "--input", "out"], cli.cmd_analyze)):
        assert p.parse_args(argv).func is func


def test_decode_keeps_30_runs_after_5_warmups_by_default():
    from djinn import cli

    _, spec = cli.resolve_spec(cli.build_parser().parse_args(["decode", "--backend", "djinn"]))
    assert (spec.runs, spec.warmup_runs) == (30, 5)
    _, spec = cli.resolve_spec(cli.build_parser().parse_args(["decode", "--runs", "7", "--warmup-runs", "0"]))
    assert (spec.runs, spec.warmup_runs) == (7, 0)


def test_every_override_flag_sets_its_spec_field():
    from djinn import cli

    samples = {int: "3", float: "0.5"}
    for flag, (field, kw) in cli._OVERRIDES.items():
        if "choices" in kw:
            value = kw["choices"][-1]
        elif flag in ("--djinn-server", "--ray-address"):
            value = "gpu-box:5556"
        elif flag == "--emulated-device-memory":
            value = "2Mi"
        elif flag == "--prompt-file":
            value = "prompt.txt"
        elif flag == "--djinn-sweep-cap":
            value = "16"  # at least the embedded default's largest N (8)
        else:
            value = samples.get(kw.get("type"), "some/model")
        argv = ["run", flag, value] + (["8"] if flag == "--agent-counts" else [])
        _, spec = cli.resolve_spec(cli.build_parser().parse_args(argv))
        dumped = spec.model_dump(mode="json", by_alias=True)
        expected = [3, 8] if flag == "--agent-counts" else kw.get("type", str)(value)
        assert dumped[field] == expected, flag


def test_sweep_cap_and_min_steps_are_checked():
    with pytest.raises(SpecError, match=r"^spec.djinnSweepCap: 16 is below the largest agent count 32"):
        parse_spec({"agentCounts": [1, 32], "djinnSweepCap": 16})
    with pytest.raises(SpecError, match="^spec.minSteps:"):
        parse_spec({"minSteps": 0})
    assert parse_spec({"agentCounts": [1, 32], "djinnSweepCap": 32}).djinn_sweep_cap == 32


def test_explicit_agent_counts_run_exactly_those_n():
    """An operator Job passes the whole spec and one N: it must not sweep on from there."""
    from djinn import cli

    spec_json = '{"agentCounts": [1, 8], "djinnSweepCap": 64, "output": {"uri": "x"}}'
    _, spec = cli.resolve_spec(cli.build_parser().parse_args(["run", "--spec-json", spec_json, "--agent-counts", "8"]))
    assert spec.agent_counts == [8] and spec.djinn_sweep_cap is None
    _, spec = cli.resolve_spec(cli.build_parser().parse_args(["run", "--spec-json", spec_json]))
    assert spec.djinn_sweep_cap == 64
    _, spec = cli.resolve_spec(cli.build_parser().parse_args(
        ["run", "--spec-json", spec_json, "--agent-counts", "2", "--djinn-sweep-cap", "16"]))
    assert spec.agent_counts == [2] and spec.djinn_sweep_cap == 16
