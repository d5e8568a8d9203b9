"""SwapFsOperations: the FUSE view of a SwapSpace (pyfuse3, thin).

  /sessions/<id>/meta.json   the session's description (owner, token ids, sizes, times)
  /sessions/<id>/kv.bin      its export file (see export_format.py): `cp` exports it
  /prefixes/<hash>/meta.json a prefix-cache block: hash, slot, times
  /prefixes/<hash>/kv.bin    its raw KV bytes ([layers, 2, block_size, kv_heads, head_dim] per block)
  /import/<name>             write an export file here to restore it as session <name>;
                             every field is checked (import_check.py): a bad file fails
                             write/close with EINVAL, one over the uid's quota with EDQUOT,
                             a full swap area with ENOSPC, a taken name with EEXIST
Permissions (mounted with default_permissions, so the kernel enforces them): a session dir
is 0700 and its files 0400, owned by the session's owner uid; other users do not even see
its name. /sessions is sticky (1777) so owners can `rm -r` their sessions; prefixes are
root's; /import is 1733. Removing either file of a session (or prefix) drops its KV and
frees the slots at once; the emptied directory stays until rmdir, which is what `rm -r`
does next. Nonsense gets a clear errno: writing or truncating a view file EROFS; mkdir,
create outside /import, links, chmod/chown/utimes EPERM; rename ENOTSUP; rmdir of a live
session ENOTEMPTY.

Every handler is wrapped: SwapError/OSError become their errno, anything else is logged and
becomes EIO — an exception never ends the FUSE main loop. Store calls run in threads; an
open kv.bin is a pinned snapshot (its slots are not reused while open) read with checksum
verification, so a reader never sees a block being rewritten. Known limits: inode numbers
are not stable across mounts; meta.json is served with direct_io (its size may change).

Parts: view_nodes.py (the kinds of node and what each shows), view_inodes.py (InodeTable:
inode numbers and lookup counts), view_handles.py (HandleTable and a record per kind of
open handle), view_imports.py (OpenImports: the files being written into /import); this
module holds the pyfuse3.Operations subclass that answers the kernel with them.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time

import pyfuse3
import trio

from swapfs.errors import SwapError
from swapfs.swap_space import SwapSpace
from swapfs.view_entries import StoredEntries
from swapfs.view_handles import BytesHandle, DirHandle, ExportHandle, HandleTable, ImportHandle
from swapfs.view_hooks import ViewHooks
from swapfs.view_imports import OpenImports
from swapfs.view_inodes import DIR_MODES, IMPORT, PREFIXES, ROOT, SESSIONS, InodeTable
from swapfs.view_nodes import FILES, EntryDir, EntryFile, FixedDir, ImportFile, Node, attributes

log = logging.getLogger("kvmm.swapfs")

__all__ = ["IMPORT", "PREFIXES", "ROOT", "SESSIONS", "SwapFsOperations"]


def _guard(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except SwapError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except ValueError as exc:
            log.info("swapfs FUSE %s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        except Exception:
            self.handler_errors += 1
            log.exception("swapfs FUSE handler %s failed; answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class SwapFsOperations(pyfuse3.Operations):
    """Attributes (touched only from the trio thread):
      _inodes: inode numbers and lookup counts (InodeTable); _handles: open files and
        directories (HandleTable); _entries: the stored sessions and prefix blocks as shown
        and removed (StoredEntries); _imports: the files being written into /import.
      handler_errors: handler exceptions turned into EIO (bugs; they are logged).
    """

    supports_dot_lookup = False

    def __init__(self, space: SwapSpace, limiter: trio.CapacityLimiter | None = None,
                 session_namer=None, hooks: ViewHooks | None = None) -> None:
        super().__init__()
        self.space = space
        self.limiter = limiter if limiter is not None else trio.CapacityLimiter(4)
        hooks = hooks or ViewHooks()
        self._start_ns = time.time_ns()
        self._entries = StoredEntries(space, hooks, self._run, self._start_ns)
        # (uid, file name written into /import) -> the session id it is restored as; the
        # daemon namespaces session ids by owner ("<uid>:<name>")
        self._imports = OpenImports(space, hooks, session_namer or (lambda uid, name: name),
                                    self._run)
        self._inodes = InodeTable()
        self._handles = HandleTable()
        self.handler_errors = 0

    async def _run(self, fn, *args):
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.limiter)

    # -- attributes -------------------------------------------------------------------------

    def _entry(self, ino: int, mode: int, uid: int, size: int = 0) -> pyfuse3.EntryAttributes:
        return attributes(ino, mode, uid, size, fixed=self._inodes.is_fixed(ino),
                          default_ns=self._start_ns)

    async def _attr(self, node: Node, ino: int) -> pyfuse3.EntryAttributes:
        if isinstance(node, FixedDir):
            return self._entry(ino, stat.S_IFDIR | DIR_MODES[ino], 0)
        if isinstance(node, ImportFile):
            imp = self._imports.get(node.name)
            if imp is None:
                raise _err(errno.ENOENT)
            return self._entry(ino, stat.S_IFREG | 0o200, imp.owner_uid, imp.received)
        return await self._entries.attr(node, ino, self._handles.open_attrs(ino))

    # -- lookups and listings ---------------------------------------------------------------

    @_guard
    async def lookup(self, parent_inode, name, ctx):
        node = self._inodes.child(parent_inode, os.fsdecode(name))
        ino = self._inodes.ino(node)
        attr = await self._attr(node, ino)
        if isinstance(node, EntryDir) and node.kind == "session" and \
                ctx.uid not in (0, attr.st_uid):
            raise _err(errno.ENOENT)         # other users do not even see the name
        self._inodes.looked_up(ino)
        return attr

    @_guard
    async def getattr(self, inode, ctx):
        return await self._attr(self._inodes.node(inode), inode)

    @_guard
    async def forget(self, inode_list):
        for ino, n in inode_list:
            self._inodes.forget(ino, n)

    @_guard
    async def opendir(self, inode, ctx):
        node = self._inodes.node(inode)
        if inode == ROOT:
            names = ["sessions", "prefixes", "import"]
        elif inode == SESSIONS:
            names = await self._entries.session_names(ctx.uid)
        elif inode == PREFIXES:
            names = [i.block_hash.hex() for i in await self._run(self.space.list_prefixes)]
        elif inode == IMPORT:
            names = self._imports.names(ctx.uid)
        elif isinstance(node, EntryDir):
            names = self._entries.files(node)
        else:
            raise _err(errno.ENOTDIR)
        return self._handles.add(DirHandle(inode, sorted(names)))

    @_guard
    async def readdir(self, fh, start_id, token):
        h = self._handles.get(fh)
        if not isinstance(h, DirHandle):
            raise _err(errno.EBADF)
        for i in range(start_id, len(h.names)):
            name = h.names[i]
            try:
                node = self._inodes.child(h.inode, name)
                ino = self._inodes.ino(node)
                attr = await self._attr(node, ino)
            except pyfuse3.FUSEError:
                continue  # vanished since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break
            self._inodes.looked_up(ino)

    @_guard
    async def releasedir(self, fh):
        self._handles.pop(fh)

    @_guard
    async def statfs(self, ctx):
        st = await self._run(self.space.statistics)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = st.capacity_bytes // 4096
        s.f_bfree = s.f_bavail = st.free_slots * st.block_bytes // 4096
        s.f_files, s.f_ffree, s.f_favail = st.capacity_slots, st.free_slots, st.free_slots
        s.f_namemax = 255
        return s

    # -- reading ----------------------------------------------------------------------------

    @_guard
    async def open(self, inode, flags, ctx):
        node = self._inodes.node(inode)
        if isinstance(node, (FixedDir, EntryDir)):
            raise _err(errno.EISDIR)
        if isinstance(node, ImportFile):
            raise _err(errno.EBUSY)  # an import is written only through the fd that created it
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _err(errno.EROFS)
        h, attrs = await self._entries.open(node, inode, self._handles.open_attrs(inode))
        fi = pyfuse3.FileInfo(fh=self._handles.add(h, attrs))
        if isinstance(h, BytesHandle):
            fi.direct_io = True          # meta.json: its size may change between opens
        else:
            fi.keep_cache = False
        return fi

    @_guard
    async def read(self, fh, off, size):
        h = self._handles.get(fh)
        if isinstance(h, BytesHandle):
            return h.data[off:off + size]
        if not isinstance(h, ExportHandle):
            raise _err(errno.EBADF)
        async with h.lock:
            return await self._run(h.reader.read, off, size)

    @_guard
    async def release(self, fh):
        h = self._handles.pop(fh)
        if isinstance(h, ExportHandle):
            await self._run(h.reader.close)
            await self._run(self.space.release_snapshot, h.snap)
        elif isinstance(h, ImportHandle):
            await self._imports.close(h)

    # -- import (view_imports.py) -----------------------------------------------------------

    @_guard
    async def create(self, parent_inode, name, mode, flags, ctx):
        if parent_inode != IMPORT:
            raise _err(errno.EPERM)
        h = await self._imports.start(os.fsdecode(name), ctx.uid)
        fi = pyfuse3.FileInfo(fh=self._handles.add(h))
        fi.direct_io = True
        node = ImportFile(h.name)
        ino = self._inodes.ino(node)
        self._inodes.looked_up(ino)
        return fi, await self._attr(node, ino)

    @_guard
    async def write(self, fh, off, buf):
        h = self._handles.get(fh)
        if not isinstance(h, ImportHandle):
            raise _err(errno.EROFS)
        return await self._imports.write(h, off, buf)

    @_guard
    async def flush(self, fh):
        h = self._handles.get(fh)
        if isinstance(h, ImportHandle):
            await self._imports.finish(h)

    @_guard
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._inodes.node(inode)
        if isinstance(node, ImportFile) and fields.update_size and attr.st_size == 0 and not (
                fields.update_mode or fields.update_uid or fields.update_gid):
            imp = self._imports.get(node.name)
            if imp is not None and imp.received == 0:       # O_TRUNC of a new import
                return await self._attr(node, inode)
        if fields.update_size and isinstance(node, EntryFile):
            raise _err(errno.EROFS)
        raise _err(errno.EPERM)

    # -- removal ----------------------------------------------------------------------------

    @_guard
    async def unlink(self, parent_inode, name, ctx):
        name = os.fsdecode(name)
        entry = self._inodes.node(parent_inode)
        if not isinstance(entry, EntryDir) or name not in FILES:
            raise _err(errno.EPERM if isinstance(entry, FixedDir) else errno.ENOENT)
        await self._entries.unlink(entry, name)

    @_guard
    async def rmdir(self, parent_inode, name, ctx):
        name = os.fsdecode(name)
        if parent_inode not in (SESSIONS, PREFIXES):
            raise _err(errno.EPERM)
        await self._entries.rmdir(EntryDir("session" if parent_inode == SESSIONS else "prefix",
                                           name))

    # -- what makes no sense here -----------------------------------------------------------

    @_guard
    async def mkdir(self, parent_inode, name, mode, ctx):
        raise _err(errno.EPERM)

    @_guard
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise _err(errno.EPERM)

    @_guard
    async def symlink(self, parent_inode, name, target, ctx):
        raise _err(errno.EPERM)

    @_guard
    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise _err(errno.EPERM)

    @_guard
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise _err(errno.ENOTSUP)

    @_guard
    async def setxattr(self, inode, name, value, ctx):
        raise _err(errno.ENOTSUP)
