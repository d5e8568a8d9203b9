"""OpenImports: the files being written into the view's /import directory.

A file created in /import is an export file arriving (export_format.SessionImporter): it
is checked as it arrives (import_check.py) and committed as session
`session_namer(uid, name)` when it is closed (flush). The daemon's hooks (view_hooks.py)
decide quotas and hear of the commit. Errors: EEXIST for a name being imported or a session
that exists already; the hook's EDQUOT/ENOSPC; a bad file EINVAL (SwapError.errno); once a
write failed, every later write and the flush answer the same errno.
"""
from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import pyfuse3

from swapfs.errors import SwapError, SwapNotFoundError
from swapfs.export_format import SessionImporter
from swapfs.stored_sessions import check_session_id
from swapfs.swap_space import SwapSpace
from swapfs.view_handles import ImportHandle
from swapfs.view_hooks import ViewHooks

log = logging.getLogger("kvmm.swapfs")


class OpenImports:
    """Attributes (touched only from the trio thread):
      _by_name: file name in /import -> the SessionImporter of the import open under it;
        an entry lives from create to release (committed, refused or abandoned).
      run: runs a blocking store call in a thread (the view's limiter), awaited.
    """

    def __init__(self, space: SwapSpace, hooks: ViewHooks,
                 session_namer: Callable[[int, str], str],
                 run: Callable[..., Awaitable]) -> None:
        self.space = space
        self.hooks = hooks
        self.session_namer = session_namer
        self.run = run
        self._by_name: dict[str, SessionImporter] = {}

    def get(self, name: str) -> SessionImporter | None:
        return self._by_name.get(name)

    def names(self, uid: int) -> list[str]:
        """The names in /import that `uid` sees (root sees all)."""
        return [n for n, imp in self._by_name.items() if uid in (0, imp.owner_uid)]

    async def start(self, name: str, uid: int) -> ImportHandle:
        """create(): a new import of `name` by `uid`."""
        check_session_id(name)
        if name in self._by_name:
            raise pyfuse3.FUSEError(errno.EEXIST)
        session_id = self.session_namer(uid, name)
        try:
            await self.run(self.space.session_info, session_id)
            raise pyfuse3.FUSEError(errno.EEXIST)
        except SwapNotFoundError:
            pass
        if self.hooks.import_allowed is not None:       # OSError(EDQUOT) when over its quota
            self.hooks.import_allowed(uid, *self._pending(uid, None))
        imp = SessionImporter(self.space, session_id, uid, self.hooks.import_policy)
        self._by_name[name] = imp
        return ImportHandle(name, uid, imp)

    async def write(self, h: ImportHandle, off: int, buf: bytes) -> int:
        if h.error is not None:
            raise pyfuse3.FUSEError(h.error)
        async with h.lock:
            try:
                n = await self.run(h.importer.write, off, buf)
            except SwapError as exc:
                h.error = exc.errno
                log.warning("swapfs: %s", exc)
                raise
            imp = h.importer
            if imp.meta is not None and not h.quota_checked and self.hooks.import_allowed:
                h.quota_checked = True
                try:
                    self.hooks.import_allowed(h.uid, *self._pending(h.uid, imp))
                except OSError as exc:
                    h.error = exc.errno
                    log.warning("swapfs: import of %r refused: %s", imp.session_id, exc.strerror)
                    raise
            return n

    def _pending(self, uid: int, this: SessionImporter | None) -> tuple[int, int]:
        """(sessions, swap bytes) that `uid`'s open imports will add, `this` one included
        (counted as a new one when None)."""
        mine = [i for i in self._by_name.values() if i.owner_uid == uid and not i.done]
        if this is None:
            mine.append(None)
        nbytes = sum(i.meta["num_blocks"] * i.block_bytes for i in mine
                     if i is not None and i.meta is not None)
        return len(mine), nbytes

    async def finish(self, h: ImportHandle) -> None:
        """flush(): check and commit the import (once; later flushes do nothing)."""
        if h.importer.done:
            return
        if h.error is not None:
            raise pyfuse3.FUSEError(h.error)
        async with h.lock:
            try:
                info = await self.run(h.importer.finish)
            except SwapError as exc:
                h.error = exc.errno
                log.warning("swapfs: %s", exc)
                raise
        log.info("swapfs: imported session %r (%d tokens) for uid %d", info.session_id,
                 info.num_tokens, info.owner_uid)
        if self.hooks.session_imported is not None:
            await self.hooks.session_imported(info.session_id)

    async def close(self, h: ImportHandle) -> None:
        """release(): the name leaves /import; an import not committed is dropped."""
        if self._by_name.get(h.name) is h.importer:
            del self._by_name[h.name]
        if not h.importer.done:
            await self.run(h.importer.abort)
