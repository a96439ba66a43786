"""Start and stop a Djinn server subprocess on free loopback ports (for the sequential runner and tests)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from typing import Optional

from djinn.server.config import ServerConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``python -m djinn.server.server_main`` with ``config`` (which names the model), bound to
    127.0.0.1 on free ports until ``stop()``; tokens reach it through the environment."""

    def __init__(self, config: ServerConfig, log_path: Optional[str] = None):
        self.config = replace(config, host="127.0.0.1", port=free_port(), control_port=free_port())
        self.port, self.control_port = self.config.port, self.config.control_port
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "djinn.server.server_main", *self.config.to_argv()]
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 300.0) -> "LocalServer":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log, env={**os.environ, **self.config.token_env()})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Djinn server exited with {self.proc.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.control_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Djinn server not healthy within {timeout:.0f} s")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.control_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
