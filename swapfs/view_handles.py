"""The open files and directories of the swapfs view: one record type per kind of handle,
and the HandleTable that numbers them.

  DirHandle     an open directory: its names as listed at opendir
  BytesHandle   an open meta.json: its content as it was at open (served with direct_io)
  ExportHandle  an open kv.bin: a pinned snapshot read through an ExportReader
  ImportHandle  a file being written into /import (view_imports.py)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import pyfuse3
import trio

from swapfs.export_format import ExportReader, SessionImporter
from swapfs.records import Snapshot


@dataclass(eq=False, slots=True)
class DirHandle:
    inode: int
    names: list[str]


@dataclass(eq=False, slots=True)
class BytesHandle:
    data: bytes


@dataclass(eq=False, slots=True)
class ExportHandle:
    """`lock` serializes reads (the reader keeps one block's read-ahead)."""
    inode: int
    reader: ExportReader
    snap: Snapshot
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass(eq=False, slots=True)
class ImportHandle:
    """error: the errno every later write/flush answers once one failed (None until then);
    quota_checked: the owner's quota was checked against the size the header announced."""
    name: str
    uid: int
    importer: SessionImporter
    lock: trio.Lock = field(default_factory=trio.Lock)
    error: int | None = None
    quota_checked: bool = False


Handle = Union[DirHandle, BytesHandle, ExportHandle, ImportHandle]


class HandleTable:
    """Attributes (touched only from the trio thread):
      _handles: fh -> the handle of every file or directory open now; fh never reused.
      _open_attrs: inode -> (attributes at the first open, ExportHandles open on it) for
        exactly the inodes with an ExportHandle in `_handles`; the attributes answer getattr
        once the session or prefix is gone, so reads of the snapshot go on.
    """

    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._open_attrs: dict[int, tuple[pyfuse3.EntryAttributes, int]] = {}

    def add(self, handle: Handle, attrs: pyfuse3.EntryAttributes | None = None) -> int:
        """Number an open handle. An ExportHandle on an inode not open yet needs `attrs`,
        kept while any is open (see `open_attrs`)."""
        if isinstance(handle, ExportHandle):
            attr, count = self._open_attrs.get(handle.inode, (attrs, 0))
            if attr is None:
                raise ValueError(f"the first open of inode {handle.inode} needs its attributes")
            self._open_attrs[handle.inode] = (attr, count + 1)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def get(self, fh: int) -> Handle | None:
        """The handle open as `fh`, None if none is (the kernel never sends such an fh)."""
        return self._handles.get(fh)

    def pop(self, fh: int) -> Handle | None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, ExportHandle):
            attr, count = self._open_attrs.pop(handle.inode)
            if count > 1:
                self._open_attrs[handle.inode] = (attr, count - 1)
        return handle

    def open_attrs(self, inode: int) -> pyfuse3.EntryAttributes | None:
        """The attributes of a kv.bin open now (as at its first open), else None."""
        entry = self._open_attrs.get(inode)
        return entry[0] if entry is not None else None
