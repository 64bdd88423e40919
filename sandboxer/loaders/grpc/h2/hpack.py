"""HPACK (RFC 7541): a full decoder for the headers a server sends, and the literals we send.

The decoder keeps the dynamic table (insertion, eviction by size, size updates bounded by the
``HEADER_TABLE_SIZE`` we advertised), decodes Huffman strings and bounds the decoded header list
by the ``MAX_HEADER_LIST_SIZE`` we advertised. Its input is a hostile server's: any malformed
block is an ``HpackError`` and the connection that carried it is over (the table is shared
state; a block half applied leaves it unknown). It must never index anything it is not told
to, nor allocate more than the block's own size and the table's bound.

The encoder only writes what needs no state: indexed static entries and literals without
indexing, no Huffman. Our first block starts with a dynamic table size update to 0, which is
valid under any ``HEADER_TABLE_SIZE`` the server sets and says we will never index.
"""

from __future__ import annotations

from collections import deque

from .huffman import HuffmanError, huffman_decode

__all__ = [
    "STATIC_TABLE",
    "Decoder",
    "HpackError",
    "encode_integer",
    "encode_indexed",
    "encode_literal",
    "TABLE_SIZE_ZERO",
]

Header = tuple[bytes, bytes]

# RFC 7541 Appendix A, index 1 first.
STATIC_TABLE: tuple[Header, ...] = tuple(
    (name.encode(), value.encode())
    for name, value in (
        (":authority", ""),
        (":method", "GET"),
        (":method", "POST"),
        (":path", "/"),
        (":path", "/index.html"),
        (":scheme", "http"),
        (":scheme", "https"),
        (":status", "200"),
        (":status", "204"),
        (":status", "206"),
        (":status", "304"),
        (":status", "400"),
        (":status", "404"),
        (":status", "500"),
        ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"),
        ("accept-language", ""),
        ("accept-ranges", ""),
        ("accept", ""),
        ("access-control-allow-origin", ""),
        ("age", ""),
        ("allow", ""),
        ("authorization", ""),
        ("cache-control", ""),
        ("content-disposition", ""),
        ("content-encoding", ""),
        ("content-language", ""),
        ("content-length", ""),
        ("content-location", ""),
        ("content-range", ""),
        ("content-type", ""),
        ("cookie", ""),
        ("date", ""),
        ("etag", ""),
        ("expect", ""),
        ("expires", ""),
        ("from", ""),
        ("host", ""),
        ("if-match", ""),
        ("if-modified-since", ""),
        ("if-none-match", ""),
        ("if-range", ""),
        ("if-unmodified-since", ""),
        ("last-modified", ""),
        ("link", ""),
        ("location", ""),
        ("max-forwards", ""),
        ("proxy-authenticate", ""),
        ("proxy-authorization", ""),
        ("range", ""),
        ("referer", ""),
        ("refresh", ""),
        ("retry-after", ""),
        ("server", ""),
        ("set-cookie", ""),
        ("strict-transport-security", ""),
        ("transfer-encoding", ""),
        ("user-agent", ""),
        ("vary", ""),
        ("via", ""),
        ("www-authenticate", ""),
    )
)
ENTRY_OVERHEAD = 32  # RFC 7541 section 4.1: an entry's size is name + value + 32
_MAX_INTEGER = 1 << 32  # larger than any length or index a sane peer sends; bounds the loop
TABLE_SIZE_ZERO = b"\x20"  # a dynamic table size update to 0


class HpackError(ValueError):
    """A header block that RFC 7541 says is a decoding error (COMPRESSION_ERROR)."""


def _integer(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """The integer at ``data[pos]`` with an N-bit prefix (section 5.1), and the position after."""
    limit = (1 << prefix) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HpackError("the header block ends inside an integer")
        octet = data[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        shift += 7
        if value >= _MAX_INTEGER:
            raise HpackError("an integer in the header block is too large")
        if not octet & 0x80:
            return value, pos


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    """The string literal at ``data[pos]`` (section 5.2), Huffman-decoded if flagged."""
    if pos >= len(data):
        raise HpackError("the header block ends before a string literal")
    huffman = data[pos] & 0x80
    length, pos = _integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise HpackError(f"a string literal of {length} bytes overruns the header block")
    if not huffman:
        return data[pos:end], end
    try:
        return huffman_decode(data[pos:end]), end
    except HuffmanError as exc:
        raise HpackError(str(exc)) from exc


class Decoder:
    """One connection's HPACK decoding context (the server's encoder's peer)."""

    def __init__(self, *, max_table_size: int = 4096, max_header_list_size: int = 16384) -> None:
        self.max_table_size = max_table_size  # what we advertised: the ceiling of size updates
        self.max_header_list_size = max_header_list_size
        self.table_size = max_table_size  # the size the encoder last chose
        self._entries: deque[Header] = deque()  # newest first (index 62 is entries[0])
        self._size = 0

    @property
    def entries(self) -> tuple[Header, ...]:
        """The dynamic table, newest first."""
        return tuple(self._entries)

    @property
    def size(self) -> int:
        return self._size

    def _evict(self, room: int) -> None:
        while self._entries and self._size + room > self.table_size:
            name, value = self._entries.pop()
            self._size -= len(name) + len(value) + ENTRY_OVERHEAD

    def _add(self, header: Header) -> None:
        size = len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
        self._evict(size)
        if size <= self.table_size:  # else the table is left empty (section 4.4)
            self._entries.appendleft(header)
            self._size += size

    def _lookup(self, index: int) -> Header:
        if index == 0:
            raise HpackError("index 0 in the header block")
        if index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        at = index - len(STATIC_TABLE) - 1
        if at >= len(self._entries):
            raise HpackError(f"index {index} is beyond the dynamic table")
        return self._entries[at]

    def decode(self, block: bytes) -> list[Header]:
        """The header list of one complete header block."""
        headers: list[Header] = []
        listed = 0
        pos = 0
        end = len(block)
        while pos < end:
            octet = block[pos]
            if octet & 0x80:  # indexed field (6.1)
                index, pos = _integer(block, pos, 7)
                header = self._lookup(index)
            elif octet & 0xE0 == 0x20:  # dynamic table size update (6.3)
                if headers:
                    raise HpackError("a dynamic table size update after a header field")
                size, pos = _integer(block, pos, 5)
                if size > self.max_table_size:
                    raise HpackError(
                        f"a dynamic table size update to {size} (we allow {self.max_table_size})"
                    )
                self.table_size = size
                self._evict(0)
                continue
            else:
                indexing = octet & 0xC0 == 0x40  # literal with incremental indexing (6.2.1)
                index, pos = _integer(block, pos, 6 if indexing else 4)
                if index:
                    name = self._lookup(index)[0]
                else:
                    name, pos = _string(block, pos)
                value, pos = _string(block, pos)
                header = (name, value)
                if indexing:
                    self._add(header)
            listed += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
            if listed > self.max_header_list_size:
                raise HpackError(
                    f"the header list is over {self.max_header_list_size} bytes "
                    "(our MAX_HEADER_LIST_SIZE)"
                )
            headers.append(header)
        return headers


def encode_integer(value: int, prefix: int, first: int) -> bytes:
    """``value`` with an N-bit prefix, ``first`` holding the bits above the prefix."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_indexed(index: int) -> bytes:
    """An indexed header field (static table entries only: we keep no dynamic table)."""
    return encode_integer(index, 7, 0x80)


def encode_literal(name: bytes | int, value: bytes) -> bytes:
    """A literal header field without indexing (6.2.2), the name a static index or a literal."""
    if isinstance(name, int):
        out = encode_integer(name, 4, 0x00)
    else:
        out = b"\x00" + encode_integer(len(name), 7, 0x00) + name
    return out + encode_integer(len(value), 7, 0x00) + value
