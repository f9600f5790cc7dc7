"""Read symbols from an ELF file's symbol table (``.symtab``), including local ones.

Only what ``_extra_ops`` needs: 64-bit little-endian files (x86-64, AArch64),
looked up by name. The layouts are the System V ABI's (gABI, "Object Files":
ELF header, section header, ``Elf64_Sym``). Not pyelftools: importing it costs
~2.8 MB of RSS per worker (of issue #3's 60 MB) for six symbols.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64, _ELFDATA2LSB = 2, 1
_SHT_SYMTAB = 2
#: e_shoff (8 bytes at 0x28), then e_shentsize, e_shnum at 0x3a (Elf64_Ehdr).
_EHDR_SHOFF = struct.Struct("<Q")
_EHDR_SHENTSIZE_SHNUM = struct.Struct("<HH")
#: Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize.
_SHDR = struct.Struct("<IIQQQQIIQQ")
#: Elf64_Sym: name, info, other, shndx, value, size.
_SYM = struct.Struct("<IBBHQQ")


class ElfError(ValueError):
    """Not a 64-bit little-endian ELF file with a symbol table."""


def symbols(path: str, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Value and size of each of ``names`` in ``path``'s ``.symtab``.

    Returns:
        ``{name: (st_value, st_size)}`` for the names found (the first definition
        of each); for a shared object ``st_value`` is an offset from its load address.

    Raises:
        ElfError: not a 64-bit little-endian ELF file, or no symbol table (stripped).
        OSError: ``path`` cannot be read.
    """
    wanted = {name.encode() for name in names}
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != _ELF_MAGIC or data[4] != _ELFCLASS64 or data[5] != _ELFDATA2LSB:
        raise ElfError(f"{path} is not a 64-bit little-endian ELF file")
    (shoff,) = _EHDR_SHOFF.unpack_from(data, 0x28)
    shentsize, shnum = _EHDR_SHENTSIZE_SHNUM.unpack_from(data, 0x3A)
    sections = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    symtab = next((s for s in sections if s[1] == _SHT_SYMTAB), None)
    if symtab is None:
        raise ElfError(f"{path} has no symbol table (stripped)")
    _, _, _, _, offset, size, link, _, _, entsize = symtab
    strtab_offset = sections[link][4]
    found: dict[str, tuple[int, int]] = {}
    for at in range(offset, offset + size, entsize or _SYM.size):
        name_offset, _, _, _, value, sym_size = _SYM.unpack_from(data, at)
        start = strtab_offset + name_offset
        name = data[start:data.index(b"\0", start)]
        if name in wanted and name.decode() not in found:
            found[name.decode()] = (value, sym_size)
    return found
