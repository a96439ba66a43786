"""Djinn data-plane wire protocol, version 1 (see docs/protocol.md).

A frame is ``MAGIC(4) | version(u8) | length(u32, big-endian) | payload``.
The payload is ``header_len(u32) | header JSON | tensor bytes``; the header's
``"tensors"`` list gives each tensor's name, dtype, shape and byte range in the
tail. Frames larger than the receiver's limit are refused before reading them.
"""
from __future__ import annotations

import asyncio
import json
import struct
from typing import Any, Optional

import torch

MAGIC = b"DJNN"
VERSION = 1
_PREFIX = struct.Struct(">4sBI")
_HLEN = struct.Struct(">I")
DEFAULT_MAX_FRAME = 1 << 30

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int64": torch.int64, "int32": torch.int32}


class ProtocolError(Exception):
    """A malformed or oversized frame; the connection is answered with an error and closed."""


def encode(header: dict[str, Any], tensors: Optional[dict[str, torch.Tensor]] = None) -> bytes:
    """Frame a JSON header and named tensors (raw little-endian bytes in the tail)."""
    blobs, metas, offset = [], [], 0
    for name, t in (tensors or {}).items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {dtype} cannot travel")
        t = t.detach().cpu().contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        metas.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": len(data)})
        blobs.append(data)
        offset += len(data)
    head = json.dumps(dict(header, tensors=metas), separators=(",", ":")).encode()
    payload_len = _HLEN.size + len(head) + offset
    return b"".join([_PREFIX.pack(MAGIC, VERSION, payload_len), _HLEN.pack(len(head)), head, *blobs])


def decode_payload(payload: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if len(payload) < _HLEN.size:
        raise ProtocolError("payload shorter than its header length field")
    (hlen,) = _HLEN.unpack_from(payload)
    if hlen > len(payload) - _HLEN.size:
        raise ProtocolError("header length exceeds payload")
    try:
        header = json.loads(payload[_HLEN.size:_HLEN.size + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    tail = bytearray(payload[_HLEN.size + hlen:])
    tensors = {}
    for meta in header.pop("tensors", None) or []:
        try:
            dtype = _DTYPES[meta["dtype"]]
            lo, n = int(meta["offset"]), int(meta["nbytes"])
            shape = tuple(int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"bad tensor descriptor {meta!r}") from None
        count = 1
        for d in shape:
            count *= d
        if lo < 0 or lo + n > len(tail) or min(shape, default=0) < 0 or count * dtype.itemsize != n:
            raise ProtocolError(f"tensor {meta.get('name')!r} does not fit the frame")
        tensors[meta["name"]] = (torch.frombuffer(tail, dtype=dtype, count=count, offset=lo).reshape(shape)
                                 if count else torch.empty(shape, dtype=dtype))
    return header, tensors


async def read_frame(reader: asyncio.StreamReader, max_frame: int = DEFAULT_MAX_FRAME) -> Optional[bytes]:
    """The next payload, or None at a clean end of stream."""
    try:
        prefix = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("connection closed inside a frame prefix") from None
    magic, version, length = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a Djinn frame")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (server speaks {VERSION})")
    if length > max_frame:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_frame}-byte limit")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a frame") from None

