"""``djinn-bench``: run the agent-scaling experiment, its baselines, the server and the analysis."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from pydantic.alias_generators import to_snake

from djinn.spec import SpecError, load_spec_file, parse_spec, read_document

# The embedded default: the whole experiment on this machine in a few minutes (tiny model, CPU).
EMBEDDED_DEFAULT: dict[str, Any] = {
    "modelId": "sshleifer/tiny-gpt2",
    "baselines": ["native_pytorch", "semantic_blind", "partially_aware", "full_djinn",
                  "ray_keepalive", "ray_serverless", "djinn_agents"],
    "agentCounts": [1, 2, 4, 8],
    "iterations": 1,
    "newTokens": 20,
    "sleepSeconds": 1.0,
    "runs": 5,
    "warmupRuns": 1,
    "stopOnOom": True,
    "emulatedDeviceMemory": "1Mi",  # keep-alive: ~2 tiny-gpt2 agents fit, like 7B agents on one A100
    "output": {"uri": "out"},
}

# flag -> (spec field, argparse kwargs); the flags of the original experiment's scripts, plus ours
_OVERRIDES: dict[str, tuple[str, dict]] = {
    "--model-id": ("modelId", {}),
    "--weights": ("weights", {"choices": ["auto", "pretrained", "synthetic"]}),
    "--dtype": ("dtype", {"choices": ["auto", "float32", "float16", "bfloat16"]}),
    "--device": ("device", {"choices": ["auto", "cpu", "cuda"]}),
    "--prompt-file": ("promptFile", {}),
    "--agent-counts": ("agentCounts", {"type": int, "nargs": "+", "help": "run exactly these N (the spec's "
                                                                          "djinnSweepCap too only if given again)"}),
    "--iterations": ("iterations", {"type": int}),
    "--min-steps": ("minSteps", {"type": int, "help": "steps per N at least, in rounds of fresh agents (100 for a p99)"}),
    "--djinn-sweep-cap": ("djinnSweepCap", {"type": int, "help": "djinn_agents: double N past --agent-counts up to "
                                                                 "this cap, stopping at the first failure"}),
    "--new-tokens": ("newTokens", {"type": int}),
    "--sleep-seconds": ("sleepSeconds", {"type": float}),
    "--runs": ("runs", {"type": int}),
    "--warmup-runs": ("warmupRuns", {"type": int}),
    "--gpu-per-actor": ("gpuPerActor", {"type": float}),
    "--gpu-per-task": ("gpuPerTask", {"type": float}),
    "--emulated-device-memory": ("emulatedDeviceMemory", {"help": "keep-alive memory cap, e.g. 1Mi (CPU runs)"}),
    "--djinn-server": ("djinnServer", {"help": "host:port of a running server (default: start one locally)"}),
    "--ray-address": ("rayAddress", {"help": "existing Ray cluster (default: start a local Ray)"}),
    "--seed": ("seed", {"type": int}),
}


def _add_overrides(p: argparse.ArgumentParser, baselines: bool = True) -> None:
    p.add_argument("--spec-json", default=None, help="the spec as JSON (what the operator's Jobs pass)")
    for flag, (_, kw) in _OVERRIDES.items():
        p.add_argument(flag, default=None, **kw)
    if baselines:
        p.add_argument("--baselines", nargs="+", default=None, help="subset of the spec's baselines")
    p.add_argument("--output-dir", default=None, help="local directory or s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (MinIO, moto)")
    p.add_argument("--log-dir", default=None, help="where the local Djinn server's log goes")
    p.add_argument("--tag", default=None, help="label stored in every result document")
    p.add_argument("--stop-on-oom", dest="stop_on_oom", action="store_true", default=None)
    p.add_argument("--no-stop-on-oom", dest="stop_on_oom", action="store_false")


def _set(data: dict, field: str, value: Any) -> None:
    """Set a camelCase field of a raw spec, dropping its snake_case spelling (both are accepted)."""
    data.pop(to_snake(field), None)
    data[field] = value


def resolve_spec(args: argparse.Namespace) -> tuple[str, Any]:
    """Spec file / --spec-json / embedded default, then command-line overrides; validated once."""
    name = "experiment"
    if getattr(args, "spec_json", None):
        try:
            data = json.loads(args.spec_json)
        except json.JSONDecodeError as exc:
            raise SpecError(f"--spec-json: not valid JSON ({exc.msg})") from None
    elif getattr(args, "spec", None):
        name, data = read_document(args.spec)
    else:
        data = json.loads(json.dumps(getattr(args, "default_spec", EMBEDDED_DEFAULT)))
    if not isinstance(data, dict):
        raise SpecError("spec: expected a mapping of fields")
    for flag, (field, _) in _OVERRIDES.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            _set(data, field, value)
    if args.agent_counts is not None and args.djinn_sweep_cap is None:
        # --agent-counts runs exactly those N (an operator Job runs one): the spec's sweep goes with them
        data.pop("djinnSweepCap", None)
        data.pop("djinn_sweep_cap", None)
    if getattr(args, "baselines", None):
        data["baselines"] = args.baselines
    if args.stop_on_oom is not None:
        _set(data, "stopOnOom", args.stop_on_oom)
    if args.output_dir or args.endpoint_url:
        out = dict(data.get("output") or {})
        if args.output_dir:
            # a local directory has no S3 region or endpoint: the spec's were for its own output
            out = {**(out if args.output_dir.startswith("s3://") else {}), "uri": args.output_dir}
        if args.endpoint_url:
            _set(out, "endpointUrl", args.endpoint_url)
        data["output"] = out
    return name, parse_spec(data)


def _analyze(input_uri: str, output_uri: Optional[str], endpoint_url: Optional[str]) -> dict[str, str]:
    from djinn_analysis import analyze

    return analyze(input_uri, output_uri, endpoint_url)


def cmd_run(args: argparse.Namespace, tasks_for=None) -> int:
    from djinn.runners.experiment import plan_tasks, run_experiment

    _, spec = resolve_spec(args)
    tasks = tasks_for(spec) if tasks_for else plan_tasks(spec)
    outcome = run_experiment(spec, tasks, args.log_dir, args.tag)
    print(f"results: {len(outcome.written)} documents under {spec.output.uri}/results/")
    if not args.no_analyze and outcome.written:
        artifacts = _analyze(spec.output.uri, None, spec.output.endpoint_url)
        print("analysis: " + ", ".join(f"{k} -> {v}" for k, v in artifacts.items()))
    if outcome.failed:  # non-zero, so a Job retries the run (its document stays, a retry adds its own)
        print(f"djinn-bench: {len(outcome.failed)} run(s) failed ({', '.join(outcome.failed)}); "
              "their result documents record the error", file=sys.stderr)
        return 1
    return 0


def cmd_agents(args: argparse.Namespace) -> int:
    from djinn.runners.experiment import Task
    from djinn.spec import Baseline

    args.baselines = [args.baseline]
    return cmd_run(args, lambda spec: [Task("agent_scaling", Baseline(args.baseline))])


def cmd_decode(args: argparse.Namespace) -> int:
    from djinn.runners.experiment import Task
    from djinn.spec import Baseline

    baseline = "native_pytorch" if args.backend == "native" else args.mode
    return cmd_run(args, lambda spec: [Task("decode", Baseline(baseline))])


def cmd_analyze(args: argparse.Namespace) -> int:
    artifacts = _analyze(args.input, args.output, args.endpoint_url)
    for name, where in artifacts.items():
        print(f"{name}: {where}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from djinn.server.server_main import run

    return run(args)


def cmd_validate(args: argparse.Namespace) -> int:
    name, spec = load_spec_file(args.spec)
    print(f"{args.spec}: AgentScalingExperiment {name} is valid "
          f"({len(spec.baselines)} baselines, N={spec.agent_counts})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from djinn.server.server_main import build_parser as server_parser

    p = argparse.ArgumentParser(prog="djinn-bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="the whole experiment: every baseline in turn, then the analysis")
    run.add_argument("spec", nargs="?", help="AgentScalingExperiment YAML (default: the embedded tiny-model experiment)")
    run.add_argument("--no-analyze", action="store_true", help="skip the analysis step")
    _add_overrides(run)
    run.set_defaults(func=cmd_run)

    agents = sub.add_parser("agents", help="one agent-scaling baseline (Experiment 2.2) for each N")
    agents.add_argument("--baseline", required=True,
                        choices=["native_pytorch", "ray_keepalive", "ray_serverless", "djinn_agents"])
    agents.add_argument("spec", nargs="?")
    # the original scripts' defaults: the paper's settings, not the embedded demo (no emulated memory cap)
    agents.set_defaults(func=cmd_agents, no_analyze=True, default_spec={})
    _add_overrides(agents, baselines=False)

    decode = sub.add_parser("decode", help="Experiment 2.1: per-token latency and bytes of one decode mode")
    decode.add_argument("--backend", choices=["native", "djinn"], default="native")
    decode.add_argument("--mode", choices=["full_djinn", "partially_aware", "semantic_blind"], default="full_djinn")
    decode.add_argument("spec", nargs="?")
    decode.set_defaults(func=cmd_decode, no_analyze=True, default_spec={})
    _add_overrides(decode, baselines=False)

    analyze = sub.add_parser("analyze", help="Figure 6, Table 2, claims.json from result documents")
    analyze.add_argument("--input", required=True, help="results directory or s3://bucket/prefix")
    analyze.add_argument("--output", default=None, help="where analysis/ goes (default: the input)")
    analyze.add_argument("--endpoint-url", default=None)
    analyze.set_defaults(func=cmd_analyze)

    serve = sub.add_parser("serve", help="start a Djinn server (same flags as python -m djinn.server.server_main)")
    server_parser(serve)
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench-engine", help="engine latency vs the HBM floor and HF generate (GPU)")
    from djinn.bench.engine_bench import add_arguments, main as bench_main

    add_arguments(bench)
    bench.set_defaults(func=bench_main)

    validate = sub.add_parser("validate", help="check an AgentScalingExperiment YAML")
    validate.add_argument("spec")
    validate.set_defaults(func=cmd_validate)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from djinn.client import DjinnError
    from djinn.models.loader import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, ModelLoadError, DjinnError) as exc:
        print(f"djinn-bench: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from djinn_analysis import AnalysisError

        if not isinstance(exc, AnalysisError):
            raise
        print(f"djinn-bench: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
