"""StoredEntries: the sessions and prefix blocks of a SwapSpace as the view shows them —
their attributes, listings and open files, and their removal through the mount.

An open kv.bin is a pinned snapshot (its slots are not reused while it is open) read with
checksum verification, so a reader never sees a block being rewritten; meta.json is its
content at open.

Removing either file of a session (or prefix block) drops its KV and frees its slots at
once, the engine told first (ViewHooks.session_deleted) so a running turn is aborted; the
directory then lives on as a tombstone holding the file not yet unlinked, until rmdir —
which is what `rm -r` does next. rmdir of a live entry is ENOTEMPTY.
"""
from __future__ import annotations

import errno
import logging
import stat
from collections.abc import Awaitable, Callable

import pyfuse3
import trio

from swapfs.errors import SwapNotFoundError
from swapfs.export_format import ExportReader, build_preamble
from swapfs.records import PrefixInfo, SessionInfo
from swapfs.swap_space import SwapSpace
from swapfs.view_handles import BytesHandle, ExportHandle
from swapfs.view_hooks import ViewHooks
from swapfs.view_nodes import FILES, EntryDir, EntryFile, attributes, kv_size, meta_json

log = logging.getLogger("kvmm.swapfs")


class StoredEntries:
    """Attributes (touched only from the trio thread):
      _tombstones: EntryDir -> (owner uid, file names not yet unlinked), for exactly the
        entries removed through the mount whose directory has not been rmdir'ed.
      run: runs a blocking store call in a thread (the view's limiter), awaited.
      start_ns: the mount's start, the times of nodes that have none.
    """

    def __init__(self, space: SwapSpace, hooks: ViewHooks, run: Callable[..., Awaitable],
                 start_ns: int) -> None:
        self.space = space
        self.hooks = hooks
        self.run = run
        self.start_ns = start_ns
        self._tombstones: dict[EntryDir, tuple[int, set[str]]] = {}

    async def info(self, entry: EntryDir) -> SessionInfo | PrefixInfo:
        """The stored session or prefix block; SwapNotFoundError when there is none."""
        if entry.kind == "session":
            return await self.run(self.space.session_info, entry.name)
        return await self.prefix(entry.name)

    async def prefix(self, hexhash: str) -> PrefixInfo:
        try:
            h = bytes.fromhex(hexhash)
        except ValueError:
            raise SwapNotFoundError(f"{hexhash!r} is not a hex block hash") from None
        return await self.run(self.space.prefix_info, h)  # may wait for a commit's lock

    def meta_json(self, info: SessionInfo | PrefixInfo) -> bytes:
        return meta_json(self.space.layout, info, self.space.checksum_name)

    async def attr(self, node: EntryDir | EntryFile, ino: int,
                   open_attrs: pyfuse3.EntryAttributes | None) -> pyfuse3.EntryAttributes:
        """A node's attributes: from the store, else `open_attrs` (a kv.bin open while its
        entry went away), else from its tombstone; ENOENT when none of them knows it."""
        entry = node if isinstance(node, EntryDir) else node.dir
        try:
            info = await self.info(entry)
        except SwapNotFoundError:
            if open_attrs is not None:       # deleted while open: the snapshot lives on
                return open_attrs
            tomb = self._tombstones.get(entry)
            if tomb is None or (isinstance(node, EntryFile) and node.file not in tomb[1]):
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            mode = stat.S_IFDIR | 0o700 if isinstance(node, EntryDir) else stat.S_IFREG | 0o400
            return attributes(ino, mode, tomb[0], default_ns=self.start_ns)
        uid = info.owner_uid if isinstance(info, SessionInfo) else 0
        if isinstance(node, EntryDir):
            mode, size = stat.S_IFDIR | 0o700, 0
        else:
            mode = stat.S_IFREG | 0o400
            size = len(self.meta_json(info)) if node.file == "meta.json" else \
                kv_size(self.space.layout, info, self.space.checksum_name)
        return attributes(ino, mode, uid, size, info.last_used, info.created,
                          default_ns=self.start_ns)

    async def open(self, node: EntryFile, ino: int, open_attrs: pyfuse3.EntryAttributes | None
                   ) -> tuple[BytesHandle | ExportHandle, pyfuse3.EntryAttributes | None]:
        """A handle on a file of an entry, and for a kv.bin the attributes its opens keep
        (`open_attrs` when it is open already, else its own now, sized as the snapshot)."""
        if node.kind == "session":
            if node.file == "meta.json":
                info = await self.run(self.space.session_info, node.name)
                return BytesHandle(self.meta_json(info)), None
            snap = await self.run(self.space.session_snapshot, node.name)
            preamble = build_preamble(self.space.layout, snap.session,
                                      [r.crc for r in snap.refs], self.space.checksum_name)
        else:
            info = await self.prefix(node.name)
            if node.file == "meta.json":
                return BytesHandle(self.meta_json(info)), None
            snap = await self.run(self.space.prefix_snapshot, info.block_hash)
            preamble = b""
        reader = ExportReader(self.space, snap.refs, preamble)
        try:
            attrs = open_attrs
            if attrs is None:
                attrs = await self.attr(node, ino, None)
                attrs.st_size = reader.size
        except BaseException:                # gone meanwhile: let go of the snapshot
            with trio.CancelScope(shield=True):
                await self.run(reader.close)
                await self.run(self.space.release_snapshot, snap)
            raise
        return ExportHandle(ino, reader, snap), attrs

    # -- listings ---------------------------------------------------------------------------

    async def session_names(self, uid: int) -> list[str]:
        """/sessions as `uid` sees it: its sessions (all for root), and its tombstones."""
        owner = None if uid == 0 else uid
        names = [i.session_id for i in await self.run(self.space.list_sessions, owner)]
        names += [t.name for t, (tomb_uid, _r) in self._tombstones.items()
                  if t.kind == "session" and t.name not in names and uid in (0, tomb_uid)]
        return names

    def files(self, entry: EntryDir) -> list[str]:
        tomb = self._tombstones.get(entry)
        return [n for n in FILES if tomb is None or n in tomb[1]]

    # -- removal ----------------------------------------------------------------------------

    async def unlink(self, entry: EntryDir, name: str) -> None:
        """Remove file `name` (one of FILES) of `entry`: the first one drops the entry."""
        if entry in self._tombstones:
            remaining = self._tombstones[entry][1]
            if name not in remaining:
                raise pyfuse3.FUSEError(errno.ENOENT)
            remaining.discard(name)
            return
        if entry.kind == "session":
            owner = (await self.run(self.space.session_info, entry.name)).owner_uid
            if self.hooks.session_deleted is not None:     # the engine first: it aborts
                await self.hooks.session_deleted(entry.name)  # a running turn, frees the KV
            try:
                await self.run(self.space.delete_session, entry.name)
            except SwapNotFoundError:
                pass                                        # the engine deleted it
        else:
            owner = 0
            if not await self.run(self.space.drop_prefix_blocks,
                                  [(await self.prefix(entry.name)).block_hash]):
                raise pyfuse3.FUSEError(errno.ENOENT)
        self._tombstones[entry] = (owner, {n for n in FILES if n != name})
        log.info("swapfs: %s %s removed through the mount",
                 "session" if entry.kind == "session" else "prefix block", entry.name)

    async def rmdir(self, entry: EntryDir) -> None:
        if entry in self._tombstones:
            if self._tombstones[entry][1]:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            del self._tombstones[entry]
            return
        try:
            await self.info(entry)
        except SwapNotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        raise pyfuse3.FUSEError(errno.ENOTEMPTY)
