"""The one Djinn server configuration: ``server_main`` parses its flags into it, and everything that
starts a server (the local runner, the tests, the operator's Deployment) builds one and turns it into
those flags with :meth:`ServerConfig.to_argv`. Importable without torch (the operator has none)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from djinn.server.limits import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S, DEFAULT_SHUTDOWN_GRACE_S

TOKEN_ENV, ADMIN_TOKEN_ENV = "DJINN_AUTH_TOKEN", "DJINN_ADMIN_TOKEN"


@dataclass
class ServerConfig:
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    host: str = "127.0.0.1"
    port: int = 5556
    control_port: Optional[int] = 5555      # None: no control plane
    max_concurrent: int = 64
    max_vram_gb: float = 80.0
    max_seq_len: int = 512
    max_slots: int = 1024                   # requests running at once (the decode batch)
    prefill_chunk: int = 4096               # most prefill tokens per engine step (larger GEMMs, fewer steps)
    max_step_ms: float = 100.0              # prefill chunks shrink so a step with decodes stays within this
    kv_block_size: int = 16                 # tokens per KV block
    host_kv_gb: Optional[float] = None      # host memory for parked KV (pinned on a GPU); None: half the free
    session_ttl_s: float = 600.0
    max_sessions: int = 16384               # open sessions at once (~1 KiB each without KV); past it: concurrency_limit
    orphan_ttl_s: float = 60.0
    weights: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    model_id: Optional[str] = None          # loaded at start; the default model of sessions that name none
    allow_models: tuple[str, ...] = ()      # loadable from the wire besides model_id and the shipped configs
    max_frame: Optional[int] = None         # bytes; None: derived from the loaded models (limits.kv_frame_bytes)
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    insecure: bool = False
    auth_token: Optional[str] = None        # required on both planes when set; travels in env, never argv
    admin_token: Optional[str] = None       # lists and deletes any session on the control plane

    def to_argv(self) -> list[str]:
        """The ``python -m djinn.server.server_main`` flags that give back this config (tokens excluded:
        they belong in the environment, see :meth:`token_env`)."""
        kind, _, index = self.device.partition(":")
        argv = ["--device", kind, *(["--gpu", index] if index else [])]
        for f in fields(self):
            value, flag = getattr(self, f.name), _FLAGS.get(f.name)
            if flag is None or value is None or value is False:
                continue
            if isinstance(value, str):  # one argument: a value starting with "-" is not taken for a flag
                argv.append(f"{flag}={value}")
            elif f.name == "allow_models":
                argv += [f"--allow-model={model}" for model in value]
            elif f.name == "max_frame":
                argv += [flag, f"{value / 2**20:.10g}"]
            elif value is True:
                argv.append(flag)
            else:
                argv += [flag, f"{value:.10g}" if isinstance(value, float) else str(value)]
        if self.control_port is None:
            argv += ["--control-port", "-1"]
        return argv

    def token_env(self) -> dict[str, str]:
        return {k: v for k, v in ((TOKEN_ENV, self.auth_token), (ADMIN_TOKEN_ENV, self.admin_token)) if v}


_FLAGS = {"host": "--host", "port": "--port", "control_port": "--control-port", "max_concurrent": "--max-concurrent",
          "max_vram_gb": "--max-vram-gb", "max_seq_len": "--max-seq-len", "max_slots": "--max-slots",
          "prefill_chunk": "--prefill-chunk", "max_step_ms": "--max-step-ms", "kv_block_size": "--kv-block-size",
          "host_kv_gb": "--host-kv-gb",
          "session_ttl_s": "--session-ttl", "max_sessions": "--max-sessions", "orphan_ttl_s": "--orphan-ttl", "weights": "--weights",
          "dtype": "--dtype", "seed": "--seed", "model_id": "--model-id", "allow_models": "--allow-model",
          "max_frame": "--max-frame-mb", "shutdown_grace_s": "--shutdown-grace", "read_timeout_s": "--read-timeout",
          "idle_timeout_s": "--idle-timeout", "insecure": "--insecure"}
