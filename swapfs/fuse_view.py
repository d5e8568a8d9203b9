"""SwapFsOperations: the FUSE view of a SwapSpace (pyfuse3, thin).

  /sessions/<id>/meta.json   the session's description (owner, token ids, sizes, times)
  /sessions/<id>/kv.bin      its export file (see export_format.py): `cp` exports it
  /prefixes/<hash>/meta.json a prefix-cache block: hash, slot, times
  /prefixes/<hash>/kv.bin    its raw KV bytes (the engine's kv[block] layout)
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
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections import Counter
from typing import Any

import pyfuse3
import trio

from swapfs.errors import SwapError, SwapNotFoundError
from swapfs.export_format import ExportReader, SessionImporter, build_preamble
from swapfs.stored_sessions import check_session_id
from swapfs.swap_space import SwapSpace
from swapfs.view_hooks import ViewHooks

log = logging.getLogger("kvmm.swapfs")

ROOT, SESSIONS, PREFIXES, IMPORT = pyfuse3.ROOT_INODE, 2, 3, 4
_FIXED = {ROOT: ("dir", ""), SESSIONS: ("dir", "sessions"), PREFIXES: ("dir", "prefixes"),
          IMPORT: ("dir", "import")}
_FIXED_INO = {key: ino for ino, key in _FIXED.items()}
_DIR_MODES = {ROOT: 0o755, SESSIONS: 0o1777, PREFIXES: 0o700, IMPORT: 0o1733}
_FILES = ("meta.json", "kv.bin")
_TIMEOUT = 0.0   # entries change behind the kernel's back (engine saves, deletes)


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
      _key_ino / _ino_key: inode <-> key, keys ("sdir", id), ("sfile", id, name), ("pdir", hex),
        ("pfile", hex, name), ("ifile", name); an inode maps iff its lookup count > 0 or it
        is fixed. _lookups: the kernel's lookup count per dynamic inode.
      _handles: fh -> open handle state; _imports: name -> SessionImporter of an open import.
      _tombstones: ("s"|"p", name) -> (owner uid, file names not yet unlinked) of a session or
        prefix dropped through the mount whose directory awaits rmdir.
      _open_attrs: inode -> (attributes at open, open handles) for kv.bin files open now; the
        attributes answer getattr once the session is gone, so reads of the snapshot go on.
      handler_errors: handler exceptions turned into EIO (bugs; they are logged).
    """

    supports_dot_lookup = False

    def __init__(self, space: SwapSpace, limiter: trio.CapacityLimiter | None = None,
                 session_namer=None, hooks: ViewHooks | None = None) -> None:
        super().__init__()
        self.space = space
        self.hooks = hooks or ViewHooks()
        # (uid, file name written into /import) -> the session id it is restored as; the
        # daemon namespaces session ids by owner ("<uid>:<name>")
        self.session_namer = session_namer or (lambda uid, name: name)
        self.limiter = limiter if limiter is not None else trio.CapacityLimiter(4)
        self._key_ino: dict[tuple, int] = {}
        self._ino_key: dict[int, tuple] = {}
        self._lookups: Counter[int] = Counter()
        self._next_ino = 16
        self._handles: dict[int, dict[str, Any]] = {}
        self._next_fh = 1
        self._imports: dict[str, SessionImporter] = {}
        self._tombstones: dict[tuple[str, str], tuple[int, set[str]]] = {}
        self._open_attrs: dict[int, tuple[pyfuse3.EntryAttributes, int]] = {}
        self._start_ns = time.time_ns()
        self.handler_errors = 0

    async def _run(self, fn, *args):
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.limiter)

    # -- inodes and attributes ----------------------------------------------------------

    def _ino(self, key: tuple) -> int:
        if key in _FIXED_INO:
            return _FIXED_INO[key]
        ino = self._key_ino.get(key)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._key_ino[key], self._ino_key[ino] = ino, key
        return ino

    def _key(self, ino: int) -> tuple:
        if ino in _FIXED:
            return _FIXED[ino]
        try:
            return self._ino_key[ino]
        except KeyError:
            raise _err(errno.ENOENT) from None

    def _entry(self, ino: int, mode: int, uid: int, size: int = 0, mtime: float | None = None,
               ctime: float | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = 300.0 if ino in _FIXED else _TIMEOUT
        a.st_mode, a.st_uid, a.st_gid = mode, uid, 0 if uid == 0 else uid
        a.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        a.st_size, a.st_blksize = size, 1 << 20
        a.st_blocks = -(-size // 512)
        m = int(mtime * 1e9) if mtime else self._start_ns
        c = int(ctime * 1e9) if ctime else m
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = m, m, c
        return a

    async def _attr(self, key: tuple, ino: int) -> pyfuse3.EntryAttributes:
        kind = key[0]
        if kind == "dir":
            return self._entry(ino, stat.S_IFDIR | _DIR_MODES[ino], 0)
        if kind == "ifile":
            imp = self._imports.get(key[1])
            if imp is None:
                raise _err(errno.ENOENT)
            return self._entry(ino, stat.S_IFREG | 0o200, imp.owner_uid, imp.received)
        tomb = self._tombstones.get(("s" if kind[0] == "s" else "p", key[1]))
        try:
            if kind[0] == "s":
                info = await self._run(self.space.session_info, key[1])
                uid, mtime, ctime = info.owner_uid, info.last_used, info.created
            else:
                info = await self._prefix(key[1])
                uid, mtime, ctime = 0, info.last_used, info.created
        except SwapNotFoundError:
            if ino in self._open_attrs:      # deleted while open: the snapshot lives on
                return self._open_attrs[ino][0]
            if tomb is None or (kind.endswith("file") and key[2] not in tomb[1]):
                raise _err(errno.ENOENT) from None
            mode = stat.S_IFDIR | 0o700 if kind.endswith("dir") else stat.S_IFREG | 0o400
            return self._entry(ino, mode, tomb[0])
        if kind.endswith("dir"):
            return self._entry(ino, stat.S_IFDIR | 0o700, uid, 0, mtime, ctime)
        size = len(self._content_meta(info)) if key[2] == "meta.json" else self._kv_size(info)
        return self._entry(ino, stat.S_IFREG | 0o400, uid, size, mtime, ctime)

    async def _prefix(self, hexhash: str):
        try:
            h = bytes.fromhex(hexhash)
        except ValueError:
            raise SwapNotFoundError(f"{hexhash!r} is not a hex block hash") from None
        return await self._run(self.space.prefix_info, h)  # may wait for a commit's lock

    def _kv_size(self, info) -> int:
        bb = self.space.layout.block_bytes
        if hasattr(info, "session_id"):
            return len(build_preamble(self.space.layout, info, [0] * info.num_blocks,
                                      self.space.checksum_name)) + \
                info.num_blocks * bb
        return bb

    def _content_meta(self, info) -> bytes:
        layout = self.space.layout
        if hasattr(info, "session_id"):
            d = {"session_id": info.session_id, "owner_uid": info.owner_uid,
                 "num_tokens": info.num_tokens, "num_kv_tokens": info.num_kv_tokens,
                 "num_blocks": info.num_blocks, "kv_bin_bytes": self._kv_size(info),
                 "created": info.created, "last_used": info.last_used,
                 "model_id": layout.model_id, "block_size": layout.block_size,
                 "block_bytes": layout.block_bytes, "token_ids": list(info.token_ids)}
        else:
            d = {"block_hash": info.block_hash.hex(), "slot_id": info.slot_id,
                 "generation": info.generation, "created": info.created,
                 "last_used": info.last_used, "model_id": layout.model_id,
                 "block_size": layout.block_size, "block_bytes": layout.block_bytes}
        return (json.dumps(d, indent=1) + "\n").encode()

    def _child_key(self, parent: int, name: str, uid: int) -> tuple:
        if parent == ROOT:
            for ino, (_k, n) in _FIXED.items():
                if n == name and ino != ROOT:
                    return _FIXED[ino]
            raise _err(errno.ENOENT)
        if parent == SESSIONS:
            return ("sdir", name)
        if parent == PREFIXES:
            return ("pdir", name)
        if parent == IMPORT:
            return ("ifile", name)
        key = self._key(parent)
        if key[0] in ("sdir", "pdir") and name in _FILES:
            return (key[0][0] + "file", key[1], name)
        raise _err(errno.ENOENT)

    def _visible(self, attr: pyfuse3.EntryAttributes, uid: int) -> bool:
        return uid == 0 or attr.st_uid == uid

    # -- lookups and listings -----------------------------------------------------------

    @_guard
    async def lookup(self, parent_inode, name, ctx):
        name = os.fsdecode(name)
        key = self._child_key(parent_inode, name, ctx.uid)
        ino = self._ino(key)
        attr = await self._attr(key, ino)
        if key[0] == "sdir" and not self._visible(attr, ctx.uid):
            raise _err(errno.ENOENT)
        if ino not in _FIXED:
            self._lookups[ino] += 1
        return attr

    @_guard
    async def getattr(self, inode, ctx):
        return await self._attr(self._key(inode), inode)

    @_guard
    async def forget(self, inode_list):
        for ino, n in inode_list:
            if ino in _FIXED:
                continue
            self._lookups[ino] -= n
            if self._lookups[ino] <= 0:
                del self._lookups[ino]
                key = self._ino_key.pop(ino, None)
                if key is not None:
                    self._key_ino.pop(key, None)

    @_guard
    async def opendir(self, inode, ctx):
        key = self._key(inode)
        if inode == ROOT:
            names = ["sessions", "prefixes", "import"]
        elif inode == SESSIONS:
            owner = None if ctx.uid == 0 else ctx.uid
            names = [i.session_id for i in await self._run(self.space.list_sessions, owner)]
            names += [n for (k, n), (uid, _r) in self._tombstones.items()
                      if k == "s" and n not in names and (ctx.uid in (0, uid))]
        elif inode == PREFIXES:
            names = [i.block_hash.hex() for i in await self._run(self.space.list_prefixes)]
        elif inode == IMPORT:
            names = [n for n, imp in self._imports.items() if ctx.uid in (0, imp.owner_uid)]
        elif key[0] in ("sdir", "pdir"):
            tomb = self._tombstones.get((key[0][0], key[1]))
            names = list(_FILES)
            if tomb is not None:
                names = [n for n in _FILES if n in tomb[1]]
        else:
            raise _err(errno.ENOTDIR)
        fh = self._new_handle(kind="dir", inode=inode, names=sorted(names), uid=ctx.uid)
        return fh

    @_guard
    async def readdir(self, fh, start_id, token):
        h = self._handles[fh]
        for i in range(start_id, len(h["names"])):
            name = h["names"][i]
            try:
                key = self._child_key(h["inode"], name, h["uid"])
                ino = self._ino(key)
                attr = await self._attr(key, ino)
            except pyfuse3.FUSEError:
                continue  # vanished since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break
            if ino not in _FIXED:
                self._lookups[ino] += 1

    @_guard
    async def releasedir(self, fh):
        self._handles.pop(fh, None)

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

    def _new_handle(self, **state) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = state
        return fh

    # -- reading ------------------------------------------------------------------------

    @_guard
    async def open(self, inode, flags, ctx):
        key = self._key(inode)
        if key[0] == "dir":
            raise _err(errno.EISDIR)
        if key[0] == "ifile":
            raise _err(errno.EBUSY)  # an import is written only through the fd that created it
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _err(errno.EROFS)
        if key[0] == "sfile":
            if key[2] == "meta.json":
                info = await self._run(self.space.session_info, key[1])
                return self._open_bytes(self._content_meta(info))
            snap = await self._run(self.space.session_snapshot, key[1])
            preamble = build_preamble(self.space.layout, snap.session,
                                      [r.crc for r in snap.refs], self.space.checksum_name)
        else:
            info = await self._prefix(key[1])
            if key[2] == "meta.json":
                return self._open_bytes(self._content_meta(info))
            snap = await self._run(self.space.prefix_snapshot, info.block_hash)
            preamble = b""
        reader = ExportReader(self.space, snap.refs, preamble)
        attr, count = self._open_attrs.get(inode, (None, 0))
        if attr is None:
            attr = await self._attr(key, inode)
            attr.st_size = reader.size
        self._open_attrs[inode] = (attr, count + 1)
        fi = pyfuse3.FileInfo(fh=self._new_handle(kind="export", reader=reader, snap=snap,
                                                  lock=trio.Lock(), inode=inode))
        fi.keep_cache = False
        return fi

    def _open_bytes(self, data: bytes) -> pyfuse3.FileInfo:
        fi = pyfuse3.FileInfo(fh=self._new_handle(kind="bytes", data=data))
        fi.direct_io = True
        return fi

    @_guard
    async def read(self, fh, off, size):
        h = self._handles[fh]
        if h["kind"] == "bytes":
            return h["data"][off:off + size]
        if h["kind"] != "export":
            raise _err(errno.EBADF)
        async with h["lock"]:
            return await self._run(h["reader"].read, off, size)

    @_guard
    async def release(self, fh):
        h = self._handles.pop(fh, None)
        if h is None:
            return
        if h["kind"] == "export":
            attr, count = self._open_attrs.pop(h["inode"])
            if count > 1:
                self._open_attrs[h["inode"]] = (attr, count - 1)
            await self._run(h["reader"].close)
            await self._run(self.space.release_snapshot, h["snap"])
        elif h["kind"] == "import":
            imp = h["importer"]
            if self._imports.get(h["name"]) is imp:
                del self._imports[h["name"]]
            if not imp.done:
                await self._run(imp.abort)

    # -- import -------------------------------------------------------------------------

    @_guard
    async def create(self, parent_inode, name, mode, flags, ctx):
        if parent_inode != IMPORT:
            raise _err(errno.EPERM)
        name = os.fsdecode(name)
        check_session_id(name)
        if name in self._imports:
            raise _err(errno.EEXIST)
        session_id = self.session_namer(ctx.uid, name)
        try:
            await self._run(self.space.session_info, session_id)
            raise _err(errno.EEXIST)
        except SwapNotFoundError:
            pass
        if self.hooks.import_allowed is not None:       # OSError(EDQUOT) when over its quota
            self.hooks.import_allowed(ctx.uid, *self._pending_imports(ctx.uid, None))
        imp = SessionImporter(self.space, session_id, ctx.uid, self.hooks.import_policy)
        self._imports[name] = imp
        fh = self._new_handle(kind="import", importer=imp, name=name, lock=trio.Lock(),
                              error=None, uid=ctx.uid, quota_checked=False)
        ino = self._ino(("ifile", name))
        self._lookups[ino] += 1
        fi = pyfuse3.FileInfo(fh=fh)
        fi.direct_io = True
        return fi, await self._attr(("ifile", name), ino)

    @_guard
    async def write(self, fh, off, buf):
        h = self._handles[fh]
        if h["kind"] != "import":
            raise _err(errno.EROFS)
        if h["error"] is not None:
            raise _err(h["error"])
        async with h["lock"]:
            try:
                n = await self._run(h["importer"].write, off, buf)
            except SwapError as exc:
                h["error"] = exc.errno
                log.warning("swapfs: %s", exc)
                raise
            imp = h["importer"]
            if imp.meta is not None and not h["quota_checked"] and self.hooks.import_allowed:
                h["quota_checked"] = True
                try:
                    self.hooks.import_allowed(h["uid"], *self._pending_imports(h["uid"], imp))
                except OSError as exc:
                    h["error"] = exc.errno
                    log.warning("swapfs: import of %r refused: %s", imp.session_id, exc.strerror)
                    raise
            return n

    def _pending_imports(self, uid: int, this) -> tuple[int, int]:
        """(sessions, swap bytes) that `uid`'s open imports will add, `this` one included
        (counted as a new one when None)."""
        mine = [i for i in self._imports.values() if i.owner_uid == uid and not i.done]
        if this is None:
            mine.append(None)
        nbytes = sum(i.meta["num_blocks"] * i.block_bytes for i in mine
                     if i is not None and i.meta is not None)
        return len(mine), nbytes

    @_guard
    async def flush(self, fh):
        h = self._handles.get(fh)
        if h is None or h["kind"] != "import" or h["importer"].done:
            return
        if h["error"] is not None:
            raise _err(h["error"])
        async with h["lock"]:
            try:
                info = await self._run(h["importer"].finish)
            except SwapError as exc:
                h["error"] = exc.errno
                log.warning("swapfs: %s", exc)
                raise
        log.info("swapfs: imported session %r (%d tokens) for uid %d", info.session_id,
                 info.num_tokens, info.owner_uid)
        if self.hooks.session_imported is not None:
            await self.hooks.session_imported(info.session_id)

    @_guard
    async def setattr(self, inode, attr, fields, fh, ctx):
        key = self._key(inode)
        if key[0] == "ifile" and fields.update_size and attr.st_size == 0 and not (
                fields.update_mode or fields.update_uid or fields.update_gid):
            imp = self._imports.get(key[1])
            if imp is not None and imp.received == 0:
                return await self._attr(key, inode)
        if fields.update_size and key[0] in ("sfile", "pfile"):
            raise _err(errno.EROFS)
        raise _err(errno.EPERM)

    # -- removal ------------------------------------------------------------------------

    @_guard
    async def unlink(self, parent_inode, name, ctx):
        name = os.fsdecode(name)
        key = self._key(parent_inode)
        if key[0] not in ("sdir", "pdir") or name not in _FILES:
            raise _err(errno.EPERM if key[0] == "dir" else errno.ENOENT)
        tkey = (key[0][0], key[1])
        if tkey in self._tombstones:
            remaining = self._tombstones[tkey][1]
            if name not in remaining:
                raise _err(errno.ENOENT)
            remaining.discard(name)
        else:
            if key[0] == "sdir":
                info = await self._run(self.space.session_info, key[1])
                owner = info.owner_uid
                if self.hooks.session_deleted is not None:     # the engine first: it aborts
                    await self.hooks.session_deleted(key[1])    # a running turn, frees the KV
                try:
                    await self._run(self.space.delete_session, key[1])
                except SwapNotFoundError:
                    pass                                        # the engine deleted it
            else:
                owner = 0
                if not await self._run(self.space.drop_prefix_blocks,
                                       [(await self._prefix(key[1])).block_hash]):
                    raise _err(errno.ENOENT)
            self._tombstones[tkey] = (owner, {n for n in _FILES if n != name})
            log.info("swapfs: %s %s removed through the mount",
                     "session" if key[0] == "sdir" else "prefix block", key[1])

    @_guard
    async def rmdir(self, parent_inode, name, ctx):
        name = os.fsdecode(name)
        if parent_inode not in (SESSIONS, PREFIXES):
            raise _err(errno.EPERM)
        tkey = ("s" if parent_inode == SESSIONS else "p", name)
        if tkey in self._tombstones:
            if self._tombstones[tkey][1]:
                raise _err(errno.ENOTEMPTY)
            del self._tombstones[tkey]
            return
        try:
            if parent_inode == SESSIONS:
                await self._run(self.space.session_info, name)
            else:
                await self._prefix(name)
        except SwapNotFoundError:
            raise _err(errno.ENOENT) from None
        raise _err(errno.ENOTEMPTY)

    # -- what makes no sense here -------------------------------------------------------

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
