"""Blocking client of the Djinn data plane.

>>> with DjinnClient("localhost:5556") as c:
...     s = c.open_session(model_id="sshleifer/tiny-gpt2")
...     first = s.generate(prompt_ids, max_new_tokens=50)      # Reason: prompt + 50 tokens
...     more = s.generate(observation_ids, max_new_tokens=50)  # Reflect: only the new tokens
...     s.close()

The address comes from the argument, else ``GENIE_SERVER_ADDRESS``, else localhost:5556; the
bearer token from the argument, else ``DJINN_AUTH_TOKEN`` (sent once per connection, in ``hello``).
"""
from __future__ import annotations

import itertools
import os
import select
import socket
import struct
from dataclasses import dataclass
from typing import Optional

import torch

from djinn.server import protocol
from djinn.spec import split_hostport

DEFAULT_ADDRESS = "localhost:5556"
TOKEN_ENV = "DJINN_AUTH_TOKEN"
REPLY_MAX_FRAME = 1 << 30  # replies come from the server we chose: a 7B semantic_blind KV at 4k tokens fits


class DjinnError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ConcurrencyLimitExceeded(DjinnError):
    """The server's --max-concurrent was reached; retry later or raise the limit."""


class SessionNotFound(DjinnError):
    pass


class DjinnConnectionError(DjinnError):
    pass


class Unauthorized(DjinnError):
    """The server requires a bearer token: pass token= or set DJINN_AUTH_TOKEN."""


_ERRORS = {"concurrency_limit": ConcurrencyLimitExceeded, "not_found": SessionNotFound, "unauthorized": Unauthorized}
_IDEMPOTENT = {"hello", "stats", "load_model", "close_session", "park"}


@dataclass
class Reply:
    header: dict
    tensors: dict[str, torch.Tensor]
    bytes_sent: int
    bytes_received: int


class DjinnClient:
    def __init__(self, address: Optional[str] = None, timeout: float = 600.0, connect_timeout: float = 10.0,
                 max_frame: int = REPLY_MAX_FRAME, token: Optional[str] = None):
        self.address = address or os.environ.get("GENIE_SERVER_ADDRESS") or DEFAULT_ADDRESS
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self.host, self.port = split_hostport(self.address)
        self.timeout, self.connect_timeout, self.max_frame = timeout, connect_timeout, max_frame
        self._sock: Optional[socket.socket] = None
        self._ids = itertools.count(1)
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- connection -----------------------------------------------------------
    def connect(self) -> "DjinnClient":
        if self._sock is None:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            except OSError as exc:
                raise DjinnConnectionError("connection", f"cannot reach Djinn server at {self.address}: {exc}") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout)
            self._sock = sock
            if self.token is not None:  # authenticates the connection; not counted as request bytes
                header, _ = protocol.decode_payload(self._roundtrip(protocol.encode(
                    {"op": "hello", "id": 0, "token": self.token}))[0])
                if not header.get("ok"):
                    self.close()
                    raise Unauthorized(header.get("code", "unauthorized"), header.get("error", "hello refused"))
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "DjinnClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return bytes(buf)

    def _stale(self) -> bool:
        """Readable while no reply is due: the server closed the connection (its idle timeout).
        poll, not select: one process of 1,000+ agents holds descriptors past select's FD_SETSIZE."""
        if self._sock is None:
            return False
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        return bool(poller.poll(0))

    def _roundtrip(self, frame: bytes) -> tuple[bytes, int]:
        if self._stale():
            self.close()  # reconnect (and authenticate) before sending: nothing was lost
        self.connect()
        try:
            self._sock.sendall(frame)
            magic, version, length = struct.unpack(">4sBI", self._recv_exact(9))
            if magic != protocol.MAGIC or length > self.max_frame:
                raise ConnectionError("bad reply frame")
            return self._recv_exact(length), length + 9
        except (OSError, ConnectionError) as exc:
            self.close()  # the next call reconnects
            raise DjinnConnectionError("connection", f"lost connection to {self.address}: {exc}") from None

    def request(self, op: str, tensors: Optional[dict[str, torch.Tensor]] = None, **fields) -> Reply:
        frame = protocol.encode(dict(fields, op=op, id=next(self._ids)), tensors)
        try:
            payload, received = self._roundtrip(frame)
        except DjinnConnectionError:
            if op not in _IDEMPOTENT:
                raise
            payload, received = self._roundtrip(frame)
        self.bytes_sent += len(frame)
        self.bytes_received += received
        header, out = protocol.decode_payload(payload)
        if not header.get("ok"):
            code = header.get("code", "error")
            if code == "protocol_error":
                self.close()  # the server closes the connection after a bad frame; reconnect next time
            raise _ERRORS.get(code, DjinnError)(code, header.get("error", "request failed"))
        return Reply(header, out, len(frame), received)

    # -- operations ---------------------------------------------------------------
    def hello(self) -> dict:
        return self.request("hello").header

    def stats(self) -> dict:
        return self.request("stats").header["metrics"]

    def load_model(self, model_id: str, weights: Optional[str] = None, dtype: Optional[str] = None) -> dict:
        return self.request("load_model", model_id=model_id, weights=weights, dtype=dtype).header

    def open_session(self, model_id: Optional[str] = None, mode: str = "full_djinn",
                     weights: Optional[str] = None) -> "DjinnSession":
        header = self.request("open_session", model_id=model_id, mode=mode, weights=weights).header
        return DjinnSession(self, header["session_id"], header["session_key"], model_id, mode)

    def generate(self, session_id: str, session_key: str, new_token_ids: list[int], max_new_tokens: int) -> Reply:
        return self.request("generate", {"tokens": torch.tensor(list(new_token_ids), dtype=torch.int64)},
                            session_id=session_id, session_key=session_key, max_new_tokens=max_new_tokens)

    def forward(self, tokens: list[int], model_id: Optional[str] = None,
                past_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None, return_kv: bool = False) -> Reply:
        tensors = {"tokens": torch.tensor(list(tokens), dtype=torch.int64)}
        if past_kv is not None:
            tensors.update(k=past_kv[0], v=past_kv[1])
        return self.request("forward", tensors, model_id=model_id, return_kv=return_kv)

    def close_session(self, session_id: str, session_key: str) -> bool:
        return self.request("close_session", session_id=session_id, session_key=session_key).header["closed"]

    def park(self, session_id: str, session_key: str) -> bool:
        return self.request("park", session_id=session_id, session_key=session_key).header["parked"]


class DjinnSession:
    """A server-side session; ``generate`` sends only tokens the server has not processed. ``key`` proves
    the session is ours (the server answers not_found to anyone without it)."""

    def __init__(self, client: DjinnClient, session_id: str, key: str, model_id: Optional[str], mode: str):
        self.client, self.id, self.key, self.model_id, self.mode = client, session_id, key, model_id, mode
        self.kv_processed_len = 0

    def generate(self, new_token_ids: list[int], max_new_tokens: int) -> list[int]:
        reply = self.client.generate(self.id, self.key, new_token_ids, max_new_tokens)
        self.kv_processed_len = reply.header["kv_processed_len"]
        return reply.tensors["tokens"].tolist()

    def park(self) -> bool:
        """Tell the server this agent is acting (idle): its KV may move to host memory."""
        return self.client.park(self.id, self.key)

    def close(self) -> bool:
        return self.client.close_session(self.id, self.key)
