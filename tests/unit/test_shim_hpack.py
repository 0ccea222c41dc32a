"""The relay's HPACK codec against the `hpack` package (the reference)."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_shim._hpack import TABLE_SIZE_ZERO, Decoder, HeaderError, encode

GRPC_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/skywalking.v3.TraceSegmentReportService/collect"),
    (b":authority", b"127.0.0.1:11800"),
    (b"te", b"trailers"),
    (b"content-type", b"application/grpc"),
    (b"user-agent", b"grpc-java-netty/1.63.0"),
    (b"grpc-accept-encoding", b"gzip"),
    (b"grpc-timeout", b"29999m"),
    (b"sw8", b"1-abc-def"),
    (b"x-trace-bin", b"AAEC"),
]

names = st.one_of(
    st.sampled_from([b":path", b"content-type", b"grpc-timeout", b"user-agent", b"x-a"]),
    st.binary(min_size=1, max_size=40).map(lambda b: b.lower()),
)
values = st.binary(max_size=300)
header_lists = st.lists(st.tuples(names, values), max_size=20)


def _reference(blocks: list[bytes]) -> list[list[tuple[bytes, bytes]]]:
    decoder = hpack.Decoder()
    return [[(bytes(n), bytes(v)) for n, v in decoder.decode(b, raw=True)] for b in blocks]


@settings(max_examples=200, deadline=None)
@given(st.lists(header_lists, min_size=1, max_size=8), st.booleans())
def test_decoder_reads_what_the_reference_encoder_writes(
    lists: list[list[tuple[bytes, bytes]]], huffman: bool
) -> None:
    """Dynamic table insertions and evictions, Huffman or raw strings, a
    small table forcing evictions."""
    encoder = hpack.Encoder()
    encoder.header_table_size = 256
    blocks = [encoder.encode(headers, huffman=huffman) for headers in lists]
    decoder = Decoder()
    assert [decoder.decode(b) for b in blocks] == _reference(blocks)
    assert [decoder.decode(b) for b in blocks[:0]] == []


@settings(max_examples=200, deadline=None)
@given(header_lists)
def test_the_reference_decoder_reads_what_encode_writes(headers: list[tuple[bytes, bytes]]) -> None:
    first = TABLE_SIZE_ZERO + encode(headers)
    second = encode(headers)
    assert _reference([first, second]) == [headers, headers]


def test_a_grpc_request_round_trips_through_a_shrinking_table() -> None:
    decoder = Decoder()
    encoder = hpack.Encoder()
    for timeout in range(200):
        headers = [*GRPC_REQUEST[:-3], (b"grpc-timeout", b"%dm" % timeout), *GRPC_REQUEST[-2:]]
        assert decoder.decode(encoder.encode(headers)) == headers
    # The peer's encoder shrinks its table to 0 and grows it again.
    encoder.header_table_size = 0
    assert decoder.decode(encoder.encode(GRPC_REQUEST)) == GRPC_REQUEST
    encoder.header_table_size = 4096
    assert decoder.decode(encoder.encode(GRPC_REQUEST)) == GRPC_REQUEST


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (b"\x80", "index 0"),
        (b"\xff\xff\xff\xff\xff\xff\x0f", "too large"),
        (b"\xff\x00", "out of range"),  # index 127: nothing in the dynamic table
        (b"\x40\x05ab", "truncated"),  # a name of 5 bytes with 2 present
        (b"\x3f\xe2\x1f", "above the limit"),  # a table size update to 4097
        (b"\x40\x81\xff\x01a", "Huffman"),  # a Huffman string that is all padding/EOS
        (b"\x82\x0f", "truncated"),
    ],
)
def test_bad_blocks_are_header_errors(block: bytes, message: str) -> None:
    with pytest.raises(HeaderError, match=message):
        Decoder().decode(block)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_or_raise_header_error(block: bytes) -> None:
    try:
        headers = Decoder().decode(block)
    except HeaderError:
        return
    assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in headers)
