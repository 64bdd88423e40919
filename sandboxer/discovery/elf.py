"""The ELF reader: does a ``.so`` export ``sandboxer_call``?

Reads an ELF file's section headers, ``.dynsym`` and ``.dynstr`` with ``struct`` (32/64-bit,
either byte order). Every offset in the file is untrusted and checked against its size before
use. It never loads, maps or dlopens the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from ..manifest import ELF_MAGIC

__all__ = ["ElfError", "elf_exports", "NATIVE_ENTRY_SYMBOL"]

NATIVE_ENTRY_SYMBOL = "sandboxer_call"


class ElfError(ValueError):
    """An ELF file whose tables cannot be read; reported, since it claims to be a library."""


_ET_DYN = 3
_SHT_STRTAB, _SHT_DYNSYM = 3, 11
_STB_GLOBAL, _STB_WEAK = 1, 2
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_STV_DEFAULT, _STV_PROTECTED = 0, 3
_MAX_TABLE = 256 << 20  # no real dynamic symbol table comes near this


@dataclass(frozen=True)
class _ElfLayout:
    """struct formats for one ELF class and byte order (fields named, since 32- and 64-bit
    symbols order them differently)."""

    ehdr: struct.Struct
    shdr: struct.Struct
    sym: struct.Struct
    sym_fields: tuple[str, ...]


def _elf_layout(elf_class: int, order: str) -> _ElfLayout:
    if elf_class == 2:
        return _ElfLayout(
            struct.Struct(order + "16xHHIQQQIHHHHHH"),
            struct.Struct(order + "IIQQQQIIQQ"),
            struct.Struct(order + "IBBHQQ"),
            ("name", "info", "other", "shndx", "value", "size"),
        )
    return _ElfLayout(
        struct.Struct(order + "16xHHIIIIIHHHHHH"),
        struct.Struct(order + "IIIIIIIIII"),
        struct.Struct(order + "IIIBBH"),
        ("name", "value", "size", "info", "other", "shndx"),
    )


def _read_at(f: Any, file_size: int, offset: int, size: int, what: str) -> bytes:
    """Exactly ``size`` bytes at ``offset``, or ElfError: every offset in the file is
    untrusted, so each is checked against the file's size before it is used."""
    if offset < 0 or size < 0 or offset + size > file_size or size > _MAX_TABLE:
        raise ElfError(f"a malformed ELF file ({what} lies outside the file)")
    f.seek(offset)
    data: bytes = f.read(size)
    if len(data) != size:
        raise ElfError(f"a malformed ELF file ({what} is truncated)")
    return data


def elf_exports(path: str | os.PathLike[str], symbol: str = NATIVE_ENTRY_SYMBOL) -> bool | None:
    """Whether the ELF shared object at ``path`` exports the function ``symbol`` in its
    dynamic symbol table (what dlsym would find), read with ``struct``, never loaded.

    None: not an ELF file. False: ELF, but not a shared object or no such export.
    Raises ElfError when the file says it is ELF but its tables cannot be read (including
    a library stripped of its section headers: without them the exports cannot be found
    without doing the dynamic loader's work).
    """
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        ident = f.read(16)
        if ident[:4] != ELF_MAGIC:
            return None
        if len(ident) < 16 or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise ElfError("a malformed ELF file (unknown class or byte order)")
        layout = _elf_layout(ident[4], "<" if ident[5] == 1 else ">")
        (e_type, _, _, _, _, shoff, _, _, _, _, shentsize, shnum, _) = layout.ehdr.unpack(
            _read_at(f, file_size, 0, layout.ehdr.size, "the ELF header")
        )
        if e_type != _ET_DYN:
            return False
        if shoff == 0:
            raise ElfError(
                "an ELF shared object without section headers; its exports "
                "cannot be read without loading it"
            )
        if shentsize < layout.shdr.size:
            raise ElfError("a malformed ELF file (section header size)")

        def section(index: int) -> tuple[int, ...]:
            return layout.shdr.unpack(
                _read_at(
                    f,
                    file_size,
                    shoff + index * shentsize,
                    layout.shdr.size,
                    f"section header {index}",
                )
            )

        if shnum == 0:  # extended numbering: the count is in section 0's size field
            shnum = section(0)[5]
        if shoff + shnum * shentsize > file_size:
            raise ElfError("a malformed ELF file (section headers lie outside the file)")
        headers = [section(i) for i in range(shnum)]
        dynsym = next((h for h in headers if h[1] == _SHT_DYNSYM), None)
        if dynsym is None:
            return False
        _, _, _, _, sym_off, sym_size, link, _, _, entsize = dynsym
        if entsize != layout.sym.size or link >= shnum or headers[link][1] != _SHT_STRTAB:
            raise ElfError("a malformed ELF file (.dynsym entry size or string table)")
        strtab = _read_at(f, file_size, headers[link][4], headers[link][5], ".dynstr")
        symbols = _read_at(f, file_size, sym_off, sym_size - sym_size % entsize, ".dynsym")
    return _exports(strtab, symbols, layout, symbol.encode())


def _exports(strtab: bytes, symbols: bytes, layout: _ElfLayout, name: bytes) -> bool:
    """Some symbol named ``name`` is a defined, visible, global or weak function.

    Names are compared by string-table offset: every offset where ``name`` NUL starts (a
    linker may share a string's tail, so ``x_sandboxer_call`` can hold ours).
    """
    wanted = name + b"\0"
    offsets, start = set(), strtab.find(wanted)
    while start != -1:
        offsets.add(start)
        start = strtab.find(wanted, start + 1)
    if not offsets:
        return False
    for values in layout.sym.iter_unpack(symbols):
        sym = dict(zip(layout.sym_fields, values, strict=True))
        if sym["name"] not in offsets or sym["shndx"] == 0:  # SHN_UNDEF: imported
            continue
        bind, kind, visibility = sym["info"] >> 4, sym["info"] & 0xF, sym["other"] & 0x3
        if (
            bind in (_STB_GLOBAL, _STB_WEAK)
            and kind in (_STT_FUNC, _STT_GNU_IFUNC)
            and visibility in (_STV_DEFAULT, _STV_PROTECTED)
        ):
            return True
    return False
