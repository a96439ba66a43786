"""``python -m djinn.server.server_main``: start a Djinn server (the experiment READMEs' flags, plus
auth, limits and shutdown: docs/protocol.md)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from djinn.server.config import ADMIN_TOKEN_ENV, TOKEN_ENV, ServerConfig
from djinn.server.limits import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S, DEFAULT_SHUTDOWN_GRACE_S


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="djinn-server", description=__doc__)
    p.add_argument("--gpu", type=int, default=0, help="CUDA device index (when --device is cuda or auto)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for remote clients)")
    p.add_argument("--port", type=int, default=5556, help="data plane port")
    p.add_argument("--control-port", type=int, default=5555, help="HTTP control plane port (-1 disables it)")
    p.add_argument("--max-concurrent", type=int, default=64,
                   help="requests served at once (env GENIE_QOS_MAX_CONCURRENCY overrides)")
    add_engine_arguments(p)
    p.add_argument("--session-ttl", type=float, default=600.0, help="seconds an idle session lives")
    p.add_argument("--orphan-ttl", type=float, default=60.0, help="seconds a session of a dropped client lives")
    p.add_argument("--max-sessions", type=int, default=ServerConfig.max_sessions,
                   help="sessions open at once; past it open_session is refused concurrency_limit")
    p.add_argument("--max-frame-mb", type=float, default=None,
                   help="largest frame accepted (default: a semantic_blind KV frame of the loaded models at "
                        "--max-seq-len, at least 1 MiB)")
    p.add_argument("--model-id", default=None, help="model to load at start; the default model of sessions")
    p.add_argument("--allow-model", action="append", default=[], metavar="ID",
                   help="a model id clients may load besides --model-id and the shipped configs (repeatable)")
    p.add_argument("--auth-token", default=None, help=f"bearer token required on both planes (env {TOKEN_ENV})")
    p.add_argument("--admin-token", default=None,
                   help=f"token that may list and delete any session (env {ADMIN_TOKEN_ENV})")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a token")
    p.add_argument("--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE_S,
                   help="seconds in-flight requests get after SIGTERM/SIGINT")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S,
                   help="seconds a started frame or HTTP body may take to arrive")
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                   help="seconds a data connection may wait between requests")
    p.add_argument("--weights", default="auto", choices=["auto", "pretrained", "synthetic"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic weights")
    p.add_argument("--log-level", default="INFO")
    return p


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's flags, shared with bench-engine (one ServerConfig, the same defaults)."""
    d = ServerConfig()
    p.add_argument("--max-vram-gb", type=float, default=d.max_vram_gb, help="device memory for weights + KV cache (GiB)")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help="tokens one session may hold (a cap: memory is taken by the tokens held)")
    p.add_argument("--max-slots", type=int, default=d.max_slots, help="requests running at once (the decode batch)")
    p.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk, help="most prefill tokens per engine step")
    p.add_argument("--max-step-ms", type=float, default=d.max_step_ms,
                   help="prefill chunks shrink (by measured costs) so a step with running decodes stays within this")
    p.add_argument("--kv-block-size", type=int, default=d.kv_block_size, help="tokens per KV cache block")
    p.add_argument("--host-kv-gb", type=float, default=d.host_kv_gb,
                   help="host memory for parked sessions' KV, pinned at start on a GPU (default: half of the "
                        "available memory, cgroup limit included); when it and the device are full, requests "
                        "that cannot get in are refused out_of_memory")


def engine_config_errors(args: argparse.Namespace) -> list[str]:
    errors = []
    if args.host_kv_gb is not None and not args.host_kv_gb >= 0:
        errors.append("--host-kv-gb: must be >= 0")
    if not args.max_vram_gb > 0:
        errors.append("--max-vram-gb: must be > 0")
    if not args.max_step_ms > 0:
        errors.append("--max-step-ms: must be > 0")
    for name in ("max_seq_len", "max_slots", "prefill_chunk", "kv_block_size"):
        if getattr(args, name) < 1:
            errors.append(f"--{name.replace('_', '-')}: must be >= 1")
    if args.kv_block_size & (args.kv_block_size - 1):
        errors.append("--kv-block-size: must be a power of two (16 is the default)")
    return errors


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    max_concurrent = args.max_concurrent
    env = os.environ.get("GENIE_QOS_MAX_CONCURRENCY")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise SystemExit(f"GENIE_QOS_MAX_CONCURRENCY: expected a positive integer, got {env!r}")
        max_concurrent = int(env)
    device = args.device
    if device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{args.gpu}"
        elif device == "cuda":
            raise SystemExit("--device cuda: no CUDA GPU is visible; use --device cpu")
    if max_concurrent < 1:
        raise SystemExit("--max-concurrent: must be >= 1")
    if args.max_sessions < 1:
        raise SystemExit("--max-sessions: must be >= 1")
    token = args.auth_token or os.environ.get(TOKEN_ENV) or None
    admin = args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
    from djinn.server.server import is_loopback

    if not is_loopback(args.host) and token is None and not args.insecure:
        raise SystemExit(f"--host {args.host}: not loopback; set --auth-token (or {TOKEN_ENV}) so only your "
                         "clients are served, or pass --insecure on a network you trust")
    for name in ("shutdown_grace", "read_timeout", "idle_timeout", "session_ttl", "orphan_ttl"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')}: must be > 0 seconds")
    if args.max_frame_mb is not None and not args.max_frame_mb > 0:
        raise SystemExit("--max-frame-mb: must be > 0")
    for error in engine_config_errors(args):
        raise SystemExit(error)
    return ServerConfig(device=device, host=args.host, port=args.port,
                        control_port=None if args.control_port < 0 else args.control_port,
                        shutdown_grace_s=args.shutdown_grace, read_timeout_s=args.read_timeout,
                        idle_timeout_s=args.idle_timeout, insecure=args.insecure,
                        max_concurrent=max_concurrent, max_vram_gb=args.max_vram_gb,
                        max_seq_len=args.max_seq_len, max_slots=args.max_slots, prefill_chunk=args.prefill_chunk,
                        max_step_ms=args.max_step_ms, kv_block_size=args.kv_block_size, host_kv_gb=args.host_kv_gb,
                        session_ttl_s=args.session_ttl, orphan_ttl_s=args.orphan_ttl, max_sessions=args.max_sessions, weights=args.weights,
                        dtype=args.dtype, seed=args.seed, model_id=args.model_id, allow_models=tuple(args.allow_model),
                        max_frame=None if args.max_frame_mb is None else round(args.max_frame_mb * 2**20),
                        auth_token=token, admin_token=admin)


def run(args: argparse.Namespace) -> int:
    from djinn.server.server import serve
    from djinn.server.service import RequestError

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except SystemExit as exc:  # a bad flag: one line, exit 2 like argparse
        if not isinstance(exc.code, str):
            raise
        print(f"djinn-server: {exc.code}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"djinn-server: cannot listen: {exc}", file=sys.stderr)
        return 2
    except RequestError as exc:
        print(f"djinn-server: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
