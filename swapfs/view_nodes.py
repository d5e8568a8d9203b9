"""The kinds of node in the swapfs view, one frozen type each, and what a node shows.

  FixedDir(name)              /, /sessions, /prefixes, /import (fixed inodes, view_inodes.py)
  EntryDir(kind, name)        /sessions/<id> (kind "session"), /prefixes/<hex> ("prefix")
  EntryFile(kind, name, file) its meta.json or kv.bin
  ImportFile(name)            /import/<name>: an import being written
Nodes are values: equal iff of the same type with the same fields, so the inode table keys
on them and a tombstone is the EntryDir it stands for. `meta_json`, `kv_size` and
`attributes` build what getattr and read answer for a node; they read nothing from flash.
"""
from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from typing import Union

import pyfuse3

from swapfs.export_format import build_preamble
from swapfs.layout import KVLayout
from swapfs.records import PrefixInfo, SessionInfo

FILES = ("meta.json", "kv.bin")
ENTRY_KINDS = ("session", "prefix")
TIMEOUT = 0.0        # dynamic entries change behind the kernel's back (engine saves, deletes)
FIXED_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class FixedDir:
    name: str            # "" for the root


@dataclass(frozen=True, slots=True)
class EntryDir:
    kind: str            # "session" | "prefix"
    name: str            # the session id, or the block hash in hex

    def file(self, file: str) -> EntryFile:
        return EntryFile(self.kind, self.name, file)


@dataclass(frozen=True, slots=True)
class EntryFile:
    kind: str
    name: str
    file: str            # one of FILES

    @property
    def dir(self) -> EntryDir:
        return EntryDir(self.kind, self.name)


@dataclass(frozen=True, slots=True)
class ImportFile:
    name: str


Node = Union[FixedDir, EntryDir, EntryFile, ImportFile]


def kv_size(layout: KVLayout, info: SessionInfo | PrefixInfo, checksum_name: str) -> int:
    """Bytes of a kv.bin: a session's export file, or a prefix block's raw KV."""
    if isinstance(info, SessionInfo):
        return len(build_preamble(layout, info, [0] * info.num_blocks, checksum_name)) + \
            info.num_blocks * layout.block_bytes
    return layout.block_bytes


def meta_json(layout: KVLayout, info: SessionInfo | PrefixInfo, checksum_name: str) -> bytes:
    """The content of a meta.json."""
    if isinstance(info, SessionInfo):
        d = {"session_id": info.session_id, "owner_uid": info.owner_uid,
             "num_tokens": info.num_tokens, "num_kv_tokens": info.num_kv_tokens,
             "num_blocks": info.num_blocks, "kv_bin_bytes": kv_size(layout, info, checksum_name),
             "created": info.created, "last_used": info.last_used,
             "model_id": layout.model_id, "block_size": layout.block_size,
             "block_bytes": layout.block_bytes, "token_ids": list(info.token_ids)}
    else:
        d = {"block_hash": info.block_hash.hex(), "slot_id": info.slot_id,
             "generation": info.generation, "created": info.created,
             "last_used": info.last_used, "model_id": layout.model_id,
             "block_size": layout.block_size, "block_bytes": layout.block_bytes}
    return (json.dumps(d, indent=1) + "\n").encode()


def attributes(ino: int, mode: int, uid: int, size: int = 0, mtime: float | None = None,
               ctime: float | None = None, *, fixed: bool = False,
               default_ns: int = 0) -> pyfuse3.EntryAttributes:
    """A node's attributes; times in seconds (`default_ns`, the mount's start, when None);
    the gid is the uid's own group (0 for root)."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.entry_timeout = a.attr_timeout = FIXED_TIMEOUT if fixed else TIMEOUT
    a.st_mode, a.st_uid, a.st_gid = mode, uid, 0 if uid == 0 else uid
    a.st_nlink = 2 if stat.S_ISDIR(mode) else 1
    a.st_size, a.st_blksize = size, 1 << 20
    a.st_blocks = -(-size // 512)
    m = int(mtime * 1e9) if mtime else default_ns
    c = int(ctime * 1e9) if ctime else m
    a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = m, m, c
    return a
