"""HPACK (RFC 7541) for the relay: a lean decoder and a stateless encoder.

The relay decodes every header block it receives (each connection has its own
dynamic table) and re-encodes it for the other side. The `hpack` package does
both correctly but costs ~15 µs to decode and ~20 µs to encode a gRPC request's
headers, a third of the relay's budget per call; these functions do the same
work in a few µs:

- `Decoder` keeps the connection's dynamic table and caches Huffman-decoded
  strings (gRPC clients Huffman-code the values they send with every call);
  `hpack`'s table-driven Huffman decoder is used on a cache miss.
- `encode` never uses a dynamic table: every field is an exact static-table
  index or a literal "without indexing" (its name indexed when the static
  table has it, raw value), and each field's bytes are cached. A
  connection's first block starts with a dynamic-table-size update to 0, so
  the blocks are valid whatever SETTINGS_HEADER_TABLE_SIZE the peer sets.
  A few bytes per call more on the wire, in exchange for no per-connection
  encoder state.

Names and values stay `bytes` throughout: the relay only compares, drops, adds
and forwards them.
"""

from __future__ import annotations

from typing import Final

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]

STATIC_TABLE: Final[tuple[Header, ...]] = tuple(HeaderTable.STATIC_TABLE)
_STATIC_LEN: Final = len(STATIC_TABLE)
# RFC 7541 4.1: an entry's size is its name and value plus 32.
_ENTRY_OVERHEAD: Final = 32
DEFAULT_TABLE_SIZE: Final = 4096
# Bounds on what one client can make this process keep.
_HUFFMAN_CACHE_MAX: Final = 4096
_HUFFMAN_CACHE_ENTRY_MAX: Final = 256
_ENCODE_CACHE_MAX: Final = 8192
_ENCODE_CACHE_ENTRY_MAX: Final = 512


class HeaderError(Exception):
    """A header block that cannot be decoded (a connection error, COMPRESSION_ERROR)."""


_huffman_cache: dict[bytes, bytes] = {}


def _huffman(raw: bytes) -> bytes:
    value = _huffman_cache.get(raw)
    if value is None:
        try:
            value = decode_huffman(raw)
        except HPACKDecodingError as err:
            raise HeaderError(f"bad Huffman string: {err}") from None
        if len(raw) <= _HUFFMAN_CACHE_ENTRY_MAX:
            if len(_huffman_cache) >= _HUFFMAN_CACHE_MAX:
                _huffman_cache.clear()
            _huffman_cache[raw] = value
    return value


class Decoder:
    """One connection's decoding context (its dynamic table)."""

    __slots__ = ("_max_allowed", "_max_size", "_size", "_table")

    def __init__(self, max_allowed: int = DEFAULT_TABLE_SIZE) -> None:
        # The limit we announced (SETTINGS_HEADER_TABLE_SIZE) and the size the
        # peer's encoder chose within it.
        self._max_allowed = max_allowed
        self._max_size = max_allowed
        self._size = 0
        self._table: list[Header] = []  # newest first: index 62 is _table[0]

    def _get(self, index: int) -> Header:
        if 0 < index <= _STATIC_LEN:
            return STATIC_TABLE[index - 1]
        try:
            if index > _STATIC_LEN:
                return self._table[index - _STATIC_LEN - 1]
        except IndexError:
            pass
        raise HeaderError(f"header table index {index} is out of range")

    def _add(self, header: Header) -> None:
        size = len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
        table = self._table
        if size > self._max_size:
            table.clear()
            self._size = 0
            return
        table.insert(0, header)
        self._size += size
        self._shrink()

    def _shrink(self) -> None:
        table = self._table
        while self._size > self._max_size and table:
            name, value = table.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD

    def decode(self, block: bytes) -> list[Header]:
        """The header list of one complete block (HEADERS + CONTINUATION)."""
        headers: list[Header] = []
        append = headers.append
        pos = 0
        end = len(block)
        try:
            while pos < end:
                byte = block[pos]
                if byte & 0x80:  # indexed field
                    index = byte & 0x7F
                    pos += 1
                    if index == 0x7F:
                        index, pos = _integer_tail(block, pos, index)
                    if index == 0:
                        raise HeaderError("header table index 0")
                    append(self._get(index))
                    continue
                if byte & 0x40:  # literal with incremental indexing
                    prefix_mask, indexing = 0x3F, True
                elif byte & 0x20:  # dynamic table size update
                    size = byte & 0x1F
                    pos += 1
                    if size == 0x1F:
                        size, pos = _integer_tail(block, pos, size)
                    if size > self._max_allowed:
                        raise HeaderError(f"table size {size} above the limit")
                    self._max_size = size
                    self._shrink()
                    continue
                else:  # literal without indexing (0000) or never indexed (0001)
                    prefix_mask, indexing = 0x0F, False
                index = byte & prefix_mask
                pos += 1
                if index == prefix_mask:
                    index, pos = _integer_tail(block, pos, index)
                if index:
                    name = self._get(index)[0]
                else:
                    name, pos = _string(block, pos)
                value, pos = _string(block, pos)
                header = (name, value)
                if indexing:
                    self._add(header)
                append(header)
        except IndexError:
            raise HeaderError("truncated header block") from None
        return headers


def _integer_tail(block: bytes, pos: int, value: int) -> tuple[int, int]:
    shift = 0
    while True:
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise HeaderError("header integer too large")


def _string(block: bytes, pos: int) -> tuple[bytes, int]:
    byte = block[pos]
    length = byte & 0x7F
    pos += 1
    if length == 0x7F:
        length, pos = _integer_tail(block, pos, length)
    end = pos + length
    if end > len(block):
        raise HeaderError("truncated header string")
    raw = block[pos:end]
    return (_huffman(raw) if byte & 0x80 else raw), end


# ---- encoding -------------------------------------------------------------------

_STATIC_EXACT: Final[dict[Header, int]] = {}
_STATIC_NAME: Final[dict[bytes, int]] = {}
for _i, _h in enumerate(STATIC_TABLE, 1):
    _STATIC_EXACT.setdefault(_h, _i)
    _STATIC_NAME.setdefault(_h[0], _i)

# The first byte of every block: dynamic table size update to 0.
TABLE_SIZE_ZERO: Final = b"\x20"


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_encode_cache: dict[Header, bytes] = {}


def encode_field(header: Header) -> bytes:
    data = _encode_cache.get(header)
    if data is not None:
        return data
    index = _STATIC_EXACT.get(header)
    if index is not None:
        data = _integer(index, 7, 0x80)
    else:
        name, value = header
        name_index = _STATIC_NAME.get(name, 0)
        data = _integer(name_index, 4, 0x00)
        if not name_index:
            data += _integer(len(name), 7, 0) + name
        data += _integer(len(value), 7, 0) + value
    if len(header[0]) + len(header[1]) <= _ENCODE_CACHE_ENTRY_MAX:
        if len(_encode_cache) >= _ENCODE_CACHE_MAX:
            _encode_cache.clear()
        _encode_cache[header] = data
    return data


def encode(headers: list[Header]) -> bytes:
    """A header block for any peer; a connection's first block is prefixed
    with `TABLE_SIZE_ZERO` (see the module docstring)."""
    return b"".join([encode_field(h) for h in headers])
