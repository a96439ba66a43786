import asyncio
import struct

import pytest
import torch

from djinn.server import protocol


def test_round_trip_of_header_and_tensors():
    frame = protocol.encode({"op": "x", "n": 3}, {"a": torch.randn(2, 3).half(), "b": torch.arange(4),
                                                  "c": torch.ones(2).bfloat16(), "e": torch.empty(0, 2)})
    magic, version, length = struct.unpack(">4sBI", frame[:9])
    assert (magic, version, length) == (b"DJNN", 1, len(frame) - 9)
    header, tensors = protocol.decode_payload(frame[9:])
    assert header == {"op": "x", "n": 3}
    assert tensors["a"].dtype == torch.float16 and tensors["a"].shape == (2, 3)
    assert tensors["b"].tolist() == [0, 1, 2, 3] and tensors["c"].dtype == torch.bfloat16
    assert tensors["e"].shape == (0, 2)


@pytest.mark.parametrize("payload", [
    b"\x00\x00",  # shorter than the header length field
    struct.pack(">I", 50) + b"{}",  # header length beyond the payload
    struct.pack(">I", 3) + b"abc",  # not JSON
    struct.pack(">I", 2) + b"[]",  # not an object
])
def test_malformed_payloads_raise_protocol_error(payload):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_payload(payload)


def test_tensor_descriptor_must_fit():
    good = protocol.encode({}, {"t": torch.arange(4)})[9:]
    bad = good.replace(b'"nbytes":32', b'"nbytes":64')
    with pytest.raises(protocol.ProtocolError, match="does not fit"):
        protocol.decode_payload(bad)


def test_oversized_and_foreign_frames_are_refused_before_reading():
    async def read(data, limit):
        r = asyncio.StreamReader()
        r.feed_data(data)
        r.feed_eof()
        return await protocol.read_frame(r, limit)

    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        asyncio.run(read(struct.pack(">4sBI", b"DJNN", 1, 10**9), 1024))
    with pytest.raises(protocol.ProtocolError, match="magic"):
        asyncio.run(read(b"GET / HTTP/1.1\r\n", 1024))
    with pytest.raises(protocol.ProtocolError, match="version"):
        asyncio.run(read(struct.pack(">4sBI", b"DJNN", 9, 1), 1024))
    assert asyncio.run(read(b"", 1024)) is None
