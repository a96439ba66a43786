import asyncio
import struct

import pytest
import torch

from djinn.server import protocol


def test_round_trip_of_header_and_tensors():
    frame = protocol.encode({"op": "x", "n": 3}, {"a": torch.randn(2, 3).half(), "b": torch.arange(4),
                                                  "c": torch.ones(2).bfloat16(), "e": torch.empty(0, 2),
                                                  "s": torch.tensor(7)})
    magic, version, length = struct.unpack(">4sBI", frame[:9])
    assert (magic, version, length) == (b"DJNN", 1, len(frame) - 9)
    header, tensors = protocol.decode_payload(frame[9:])
    assert header == {"op": "x", "n": 3}
    assert tensors["a"].dtype == torch.float16 and tensors["a"].shape == (2, 3)
    assert tensors["b"].tolist() == [0, 1, 2, 3] and tensors["c"].dtype == torch.bfloat16
    assert tensors["e"].shape == (0, 2) and tensors["s"].shape == () and tensors["s"].item() == 7


@pytest.mark.parametrize("payload", [
    b"\x00\x00",  # shorter than the header length field
    struct.pack(">I", 50) + b"{}",  # header length beyond the payload
    struct.pack(">I", 3) + b"abc",  # not JSON
    struct.pack(">I", 2) + b"[]",  # not an object
])
def test_malformed_payloads_raise_protocol_error(payload):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_payload(payload)


def _payload(header: bytes, tail: bytes = b"") -> bytes:
    return struct.pack(">I", len(header)) + header + tail


T = '{"name":"t","dtype":"int64","shape":[1],"offset":0,"nbytes":8}'


@pytest.mark.parametrize("header, match", [
    (b"[" * 100000, "nests deeper"),
    (b'{"op":"generate","tensors":5}', "tensors: expected a list"),
    (b'{"op":"generate","id":NaN}', "NaN is not JSON"),
    (T.replace('"offset":0', '"offset":Infinity').join(['{"tensors":[', ']}']).encode(), "Infinity"),
    (T.replace('"t"', '["t"]').join(['{"tensors":[', ']}']).encode(), "name must be a non-empty string"),
    (T.replace('"shape":[1]', '"shape":[1e30,0]').join(['{"tensors":[', ']}']).encode(), "shape: expected an integer"),
    (T.replace('"shape":[1]', '"shape":[true]').join(['{"tensors":[', ']}']).encode(), "shape: expected an integer"),
    (T.replace('"offset":0', '"offset":0.0').join(['{"tensors":[', ']}']).encode(), "offset: expected an integer"),
    (T.replace('"int64"', '"bool"').join(['{"tensors":[', ']}']).encode(), "dtype must be one of"),
    (f'{{"tensors":[{T},{T}]}}'.encode(), "appears twice"),
    (b'{"a":"\xff"}', "not UTF-8"),
])
def test_every_malformed_descriptor_is_a_protocol_error_naming_it(header, match):
    with pytest.raises(protocol.ProtocolError, match=match):
        protocol.decode_payload(_payload(header, bytes(16)))


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


def test_a_cancel_racing_with_a_frames_bytes_is_not_lost():
    """The bytes arrive and the cancel lands in the same loop turn: asyncio.wait_for (Python < 3.12) returned the
    frame and dropped the cancel, so a stopping server went on serving a client that kept sending."""
    async def race():
        reader = asyncio.StreamReader()
        read = asyncio.ensure_future(protocol.read_frame(reader, idle_timeout=30, read_timeout=30))
        await asyncio.sleep(0.01)  # waiting for a frame to start
        reader.feed_data(protocol.encode({"op": "hello"}))
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read

    asyncio.run(race())


def test_read_timeout_is_one_deadline_for_the_whole_frame():
    """Each part on time but the frame late: prefix and payload used to get --read-timeout each."""
    frame = protocol.encode({"op": "hello"})

    async def trickle():
        reader = asyncio.StreamReader()
        read = asyncio.ensure_future(protocol.read_frame(reader, read_timeout=1))
        for part in (frame[:1], frame[1:9], frame[9:]):  # 0.6 s apart: 1.2 s in all
            reader.feed_data(part)
            await asyncio.sleep(0.6)
        return await read

    with pytest.raises(protocol.ProtocolError, match=r"^frame of \d+ bytes not received within 1 s"):
        asyncio.run(trickle())


@pytest.mark.parametrize("cut, end, message", [
    (4, "stall", r"^frame prefix not received within 0.2 s"),
    (4, "close", r"^connection closed inside a frame prefix$"),
    (12, "close", r"^connection closed inside a frame$"),
])
def test_a_frame_cut_short_says_where(cut, end, message):
    """The prefix and payload are read under one bound; a failure still says whether the prefix was in."""
    frame = protocol.encode({"op": "hello"})

    async def cut_short():
        reader = asyncio.StreamReader()
        reader.feed_data(frame[:cut])
        if end == "close":
            reader.feed_eof()
        return await protocol.read_frame(reader, read_timeout=0.2)

    with pytest.raises(protocol.ProtocolError, match=message):
        asyncio.run(cut_short())
