"""Djinn data-plane wire protocol, version 1 (see docs/protocol.md).

A frame is ``MAGIC(4) | version(u8) | length(u32, big-endian) | payload``.
The payload is ``header_len(u32) | header JSON | tensor bytes``; the header's
``"tensors"`` list gives each tensor's name, dtype, shape and byte range in the
tail. Frames larger than the receiver's limit are refused before reading them.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import struct
import sys
from typing import Any, Optional

import torch

MAGIC = b"DJNN"
VERSION = 1
_PREFIX = struct.Struct(">4sBI")
_HLEN = struct.Struct(">I")
PREFIX_BYTES = _PREFIX.size
DEFAULT_MAX_FRAME = 64 << 20  # without a model to size it from (see djinn.server.limits)
MAX_DEPTH = 32                # JSON nesting a header may use
MAX_HEADER = 1 << 20          # header bytes (token ids and KV travel as tensors, not JSON)
MAX_TENSORS, MAX_DIMS, MAX_DIM = 16, 8, 1 << 31
MAX_SPAN = 1 << 62            # bytes a shape may span, its empty dimensions counted as 1 (torch's strides fit)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int64": torch.int64, "int32": torch.int32}


class ProtocolError(Exception):
    """A malformed or oversized frame; the connection is answered with an error and closed.
    ``request_id``: the frame's ``id`` when its header parsed, echoed in that answer."""

    request_id: Any = None


def encode(header: dict[str, Any], tensors: Optional[dict[str, torch.Tensor]] = None) -> bytes:
    """Frame a JSON header and named tensors (raw little-endian bytes in the tail)."""
    blobs, metas, offset = [], [], 0
    for name, t in (tensors or {}).items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {dtype} cannot travel")
        t = t.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # 0-D tensors too
        metas.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": len(data)})
        blobs.append(data)
        offset += len(data)
    head = json.dumps(dict(header, tensors=metas), separators=(",", ":")).encode()
    payload_len = _HLEN.size + len(head) + offset
    return b"".join([_PREFIX.pack(MAGIC, VERSION, payload_len), _HLEN.pack(len(head)), head, *blobs])


def _no_constant(name: str) -> Any:
    raise ProtocolError(f"header: {name} is not JSON (strict JSON has no NaN or Infinity)")


def _depth_ok(text: str) -> bool:
    """Nesting within MAX_DEPTH, counted outside strings (json's recursion would fail far deeper, loudly)."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            esc, in_str = (not esc and ch == "\\"), (in_str if esc or ch != '"' else False)
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_header(raw: bytes) -> dict[str, Any]:
    """Strict JSON object: UTF-8, no NaN/Infinity, nesting <= MAX_DEPTH."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("header is not UTF-8") from None
    if not _depth_ok(text):
        raise ProtocolError(f"header nests deeper than {MAX_DEPTH} levels")
    try:
        header = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    except ValueError:  # Python refuses integers of more than sys.get_int_max_str_digits() digits
        raise ProtocolError(f"header: a number has more than {sys.get_int_max_str_digits()} digits") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    return header


def _int(value: Any, what: str, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
        raise ProtocolError(f"{what}: expected an integer in 0..{hi}, got {value!r}"[:200])
    return value


def _descriptor(meta: Any) -> tuple[str, torch.dtype, int, int, tuple[int, ...]]:
    """(name, dtype, offset, nbytes, shape) of one tensor descriptor, every field type-checked."""
    if not isinstance(meta, dict):
        raise ProtocolError("tensors: each entry must be an object {name, dtype, shape, offset, nbytes}")
    name, dtype = meta.get("name"), meta.get("dtype")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"tensors: name must be a non-empty string, got {name!r}"[:200])
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ProtocolError(f"tensor {name!r}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}"[:200])
    shape = meta.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ProtocolError(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} integers")
    dims = tuple(_int(d, f"tensor {name!r}: shape", MAX_DIM) for d in shape)
    lo = _int(meta.get("offset"), f"tensor {name!r}: offset", 1 << 62)
    n = _int(meta.get("nbytes"), f"tensor {name!r}: nbytes", 1 << 62)
    return name, _DTYPES[dtype], lo, n, dims


def decode_payload(payload: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header and tensors of a payload; anything malformed raises ProtocolError (nothing else)."""
    if len(payload) < _HLEN.size:
        raise ProtocolError("payload shorter than its header length field")
    (hlen,) = _HLEN.unpack_from(payload)
    if hlen > len(payload) - _HLEN.size:
        raise ProtocolError("header length exceeds payload")
    if hlen > MAX_HEADER:
        raise ProtocolError(f"header of {hlen} bytes exceeds {MAX_HEADER}; send token ids as a tensor")
    header = parse_header(payload[_HLEN.size:_HLEN.size + hlen])
    try:
        return header, _tensors(header.pop("tensors", None), bytearray(payload[_HLEN.size + hlen:]))
    except ProtocolError as exc:
        exc.request_id = header.get("id")
        raise


def _tensors(metas: Any, tail: bytearray) -> dict[str, torch.Tensor]:
    """The tensors the descriptors ``metas`` place in ``tail``."""
    if metas is None:
        metas = []
    if not isinstance(metas, list) or len(metas) > MAX_TENSORS:
        raise ProtocolError(f"tensors: expected a list of at most {MAX_TENSORS} descriptors")
    tensors: dict[str, torch.Tensor] = {}
    for meta in metas:
        name, dtype, lo, n, shape = _descriptor(meta)
        if name in tensors:
            raise ProtocolError(f"tensor {name!r} appears twice")
        if math.prod(max(d, 1) for d in shape) * dtype.itemsize > MAX_SPAN:  # strides of [0, 2**31, ...] too
            raise ProtocolError(f"tensor {name!r}: shape {list(shape)} spans more than {MAX_SPAN} bytes")
        count = math.prod(shape)
        if lo + n > len(tail) or count * dtype.itemsize != n:
            raise ProtocolError(f"tensor {name!r} does not fit the frame")
        tensors[name] = (torch.frombuffer(tail, dtype=dtype, count=count, offset=lo).reshape(shape)
                         if count else torch.empty(shape, dtype=dtype))
    return tensors


async def read_frame(reader: asyncio.StreamReader, max_frame: int = DEFAULT_MAX_FRAME,
                     idle_timeout: Optional[float] = None, read_timeout: Optional[float] = None) -> Optional[bytes]:
    """The next payload, or None at a clean end of stream. ``idle_timeout`` bounds the wait for a frame
    to start, ``read_timeout`` the time the whole frame takes once started (a stalled sender holds nothing)."""
    try:
        first = await within(reader.readexactly(1), idle_timeout)
    except asyncio.IncompleteReadError:
        return None
    except asyncio.TimeoutError:
        raise ProtocolError(f"idle for {idle_timeout:g} s with no request; reconnect when needed") from None
    seen: dict[str, int] = {}  # the frame's length, once its prefix is in: which message a failure gets
    try:
        return await within(_rest_of_frame(reader, first, max_frame, seen), read_timeout)
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a frame" if seen else "connection closed inside a frame prefix") from None
    except asyncio.TimeoutError:
        if seen:
            raise ProtocolError(f"frame of {seen['length']} bytes not received within {read_timeout:g} s") from None
        raise ProtocolError(f"frame prefix not received within {read_timeout:g} s") from None


async def _rest_of_frame(reader: asyncio.StreamReader, first: bytes, max_frame: int, seen: dict) -> bytes:
    """The prefix after its first byte, checked, then the payload: one bounded read for both (each bounded
    read costs a task and a wait, a third of a buffered frame's read)."""
    magic, version, length = _PREFIX.unpack(first + await reader.readexactly(_PREFIX.size - 1))
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a Djinn frame")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (server speaks {VERSION})")
    if length > max_frame:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_frame}-byte limit")
    seen["length"] = length
    return await reader.readexactly(length)


async def within(step: Any, timeout: Optional[float]) -> Any:
    """``step`` (a read, a drain) bounded by ``timeout``. Not asyncio.wait_for: before Python 3.12 it can
    return the data and drop a cancel that raced with it, which left a stopping server serving a busy client."""
    task = asyncio.ensure_future(step)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise asyncio.TimeoutError
    return task.result()
