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
# (length, code) -> symbol, EOS left out: meeting it is an error.
_DECODE = {(length, code): symbol for symbol, (code, length) in CODES.items() if symbol != EOS}
_BY_LENGTH = tuple(sorted({length for length, _ in _DECODE}))


def huffman_decode(data: bytes | memoryview) -> bytes:
    """The octets a Huffman-coded string literal stands for."""
    out = bytearray()
    bits = 0  # unread bits, the last ``count`` of them in ``bits``
    count = 0
    for octet in data:
        bits = (bits << 8) | octet
        count += 8
        while count >= _BY_LENGTH[0]:
            for length in _BY_LENGTH:
                if length > count:
                    break
                symbol = _DECODE.get((length, bits >> (count - length)))
                if symbol is not None:
                    out.append(symbol)
                    count -= length
                    bits &= (1 << count) - 1
                    break
            else:
                # 30 bits or more and no symbol: only EOS is that long.
                raise HuffmanError("the Huffman string holds EOS")
            if symbol is None:
                break  # a longer code: wait for the next octet
    if count > 7:
        raise HuffmanError(f"the Huffman string ends with {count} bits of padding (at most 7)")
    if bits != (1 << count) - 1:
        raise HuffmanError("the Huffman string's padding is not the most significant bits of EOS")
    return bytes(out)
