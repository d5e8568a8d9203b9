"""Kernel numbers -> names: syscalls, FUSE opcodes and io_uring opcodes.

The BPF programs key their maps by the numbers the kernel hands them (syscall nr, FUSE
opcode, io_uring opcode); the report turns them into names here. Each table is parsed from
the installed UAPI headers (`asm/unistd_64.h`, `linux/fuse.h`, `linux/io_uring.h`), so it
matches the machine; the syscall table falls back to bcc's built-in copy (bcc
`tools/syscount.py` uses `bcc.syscall` the same way). A number missing from every table is
shown as `syscall_<nr>` / `op_<nr>`, never dropped.

Left out: architectures other than the one the headers describe (the 32-bit compat table of
a 64-bit process is not distinguished).
"""
from __future__ import annotations

import functools
import re

UNISTD_HEADERS = ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h",
                  "/usr/include/aarch64-linux-gnu/asm/unistd.h", "/usr/include/asm-generic/unistd.h")
FUSE_HEADER = "/usr/include/linux/fuse.h"
IO_URING_HEADER = "/usr/include/linux/io_uring.h"

_DEFINE_NR = re.compile(r"^#define\s+__NR(?:3264)?_(\w+)\s+(\d+)\s*$", re.M)


def parse_unistd(text: str) -> dict[int, str]:
    """`#define __NR_read 0` lines -> {0: "read"} (the first name of a number wins)."""
    table: dict[int, str] = {}
    for name, nr in _DEFINE_NR.findall(text):
        table.setdefault(int(nr), name)
    return table


def parse_enum(text: str, enum_name: str, strip_prefix: str) -> dict[int, str]:
    """Members of a C `enum NAME { A = 1, B, ... }` -> {value: name without the prefix}.

    Members without an explicit value follow the previous one, as in C; members whose value
    is not an integer literal (aliases) and `*_LAST` sentinels are skipped.
    """
    m = re.search(r"enum\s+" + re.escape(enum_name) + r"\s*\{(.*?)\}", text, re.S)
    if m is None:
        return {}
    body = re.sub(r"/\*.*?\*/|//[^\n]*", "", m.group(1), flags=re.S)
    table: dict[int, str] = {}
    value = -1
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, expr = (part.strip() for part in item.partition("="))
        if expr:
            try:
                value = int(expr, 0)
            except ValueError:
                continue
        else:
            value += 1
        if name.startswith(strip_prefix):
            name = name[len(strip_prefix):]
        if name != "LAST":
            table.setdefault(value, name)
    return table


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


@functools.cache
def syscall_table() -> dict[int, str]:
    for path in UNISTD_HEADERS:
        text = _read(path)
        if text and (table := parse_unistd(text)):
            return table
    try:
        from bcc.syscall import syscalls
    except ImportError:
        return {}
    return {nr: name.decode() for nr, name in syscalls.items()}


@functools.cache
def fuse_opcode_table() -> dict[int, str]:
    text = _read(FUSE_HEADER)
    return parse_enum(text, "fuse_opcode", "FUSE_") if text else {}


@functools.cache
def io_uring_opcode_table() -> dict[int, str]:
    text = _read(IO_URING_HEADER)
    return parse_enum(text, "io_uring_op", "IORING_OP_") if text else {}


def syscall_name(nr: int) -> str:
    return syscall_table().get(nr, f"syscall_{nr}")


def syscall_nr(name: str) -> int | None:
    """The number of syscall `name` on this machine, or None when no table names it."""
    return next((nr for nr, n in syscall_table().items() if n == name), None)


def fuse_opcode_name(op: int) -> str:
    return fuse_opcode_table().get(op, f"op_{op}")


def io_uring_opcode_name(op: int) -> str:
    return io_uring_opcode_table().get(op, f"op_{op}")
