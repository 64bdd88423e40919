"""HPACK's Huffman code (RFC 7541 Appendix B): decoding string literals the server sends.

The code is canonical, so the table is only each symbol's code length (symbol order, 0-255;
EOS, symbol 256, is 30 bits): codes are handed out in order of (length, symbol), each the next
value at its length. The lengths are RFC 7541 Appendix B's; a test checks a few codes against it.
Decoding must never accept EOS, padding longer than 7 bits or padding that is not all ones
(RFC 7541 section 5.2): each is a ``HuffmanError``.
"""

from __future__ import annotations

__all__ = ["HuffmanError", "huffman_decode", "CODES"]

EOS = 256
_EOS_LENGTH = 30

# fmt: off
_LENGTHS = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,  # 0x00
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,  # 0x10
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,  # 0x20
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,  # 0x30
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,  # 0x40
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,  # 0x50
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,  # 0x60
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,  # 0x70
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,  # 0x80
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,  # 0x90
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,  # 0xa0
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,  # 0xb0
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,  # 0xc0
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,  # 0xd0
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,  # 0xe0
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,  # 0xf0
)
# fmt: on


class HuffmanError(ValueError):
    """A Huffman-coded string that RFC 7541 section 5.2 says is a decoding error."""


def _canonical(lengths: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length) for a canonical code given each symbol's length."""
    order = sorted(range(len(lengths)), key=lambda s: (lengths[s], s))
    codes: dict[int, tuple[int, int]] = {}
    code, previous = -1, lengths[order[0]]
    for symbol in order:
        code = (code + 1) << (lengths[symbol] - previous)
        previous = lengths[symbol]
        codes[symbol] = (code, previous)
    return codes


CODES = _canonical((*_LENGTHS, _EOS_LENGTH))

# Decoding walks the code's tree four bits at a time (as nghttp2 does): a state is an inner node
# (the bits read since the last symbol), and for each state and nibble the table holds the next
# state and the symbol completed on the way, if any (no code is shorter than 5 bits, so at most
# one per nibble). Linear in the input whatever it holds.
_NO_SYMBOL = -1
_EOS_SEEN = -2


def _tree() -> tuple[list[list[int]], dict[int, int]]:
    """Inner nodes as [child for 0, child for 1] (a child >= 0 is a node, < 0 is ~symbol),
    and each node's padding status: depth if the path to it is all ones, else -1."""
    nodes: list[list[int]] = [[0, 0]]
    ones = {0: 0}
    empty = 0  # a fresh node's children: 0 never is a child (it is the root)
    for symbol, (code, length) in CODES.items():
        node = 0
        for bit_at in range(length - 1, -1, -1):
            bit = (code >> bit_at) & 1
            if bit_at == 0:
                nodes[node][bit] = ~symbol
            else:
                if nodes[node][bit] == empty:
                    nodes.append([0, 0])
                    child = len(nodes) - 1
                    nodes[node][bit] = child
                    depth = ones[node]
                    ones[child] = depth + 1 if bit and depth >= 0 else -1
                node = nodes[node][bit]
    return nodes, ones


def _nibble_table() -> tuple[tuple[tuple[int, int], ...], tuple[bool, ...]]:
    nodes, ones = _tree()
    table: list[tuple[int, int]] = []
    for state in range(len(nodes)):
        for nibble in range(16):
            node, emitted = state, _NO_SYMBOL
            for bit_at in (3, 2, 1, 0):
                child = nodes[node][(nibble >> bit_at) & 1]
                if child >= 0:
                    node = child
                elif ~child == EOS:
                    emitted = _EOS_SEEN
                    break
                else:
                    emitted, node = ~child, 0
            table.append((node, emitted))
    # Where a string may end: on a symbol's last bit, or in at most 7 bits of EOS's prefix.
    accept = tuple(0 <= ones[state] <= 7 for state in range(len(nodes)))
    return tuple(table), accept


_TABLE, _ACCEPT = _nibble_table()


def huffman_decode(data: bytes | memoryview) -> bytes:
    """The octets a Huffman-coded string literal stands for."""
    table = _TABLE
    out = bytearray()
    state = 0
    for octet in data:
        state, symbol = table[state << 4 | octet >> 4]
        if symbol >= 0:
            out.append(symbol)
        elif symbol == _EOS_SEEN:
            raise HuffmanError("the Huffman string holds EOS")
        state, symbol = table[state << 4 | octet & 0xF]
        if symbol >= 0:
            out.append(symbol)
        elif symbol == _EOS_SEEN:
            raise HuffmanError("the Huffman string holds EOS")
    if not _ACCEPT[state]:
        raise HuffmanError(
            "the Huffman string ends in padding longer than 7 bits or not EOS's first bits"
        )
    return bytes(out)
