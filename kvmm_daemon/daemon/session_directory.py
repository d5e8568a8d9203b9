"""SessionDirectory: per-uid session names over the engine's flat session ids.

A session's engine id is "<uid>:<name>", so two apps may both call their session "chat", and
ownership is part of the id: it survives a daemon restart (sessions restored from flash keep
their owner) without a table. A client names its own sessions by bare name; root may name
anybody's as "uid:name", and lists show other uids' sessions that way.

Mechanism only: the engine stores and applies sessions (opening and deleting are queued and
take effect at its next step; `EngineLoop.barrier` waits for that), this module resolves
names, checks ownership and the per-uid count — against the SessionLedger (quotas.py),
which counts a session the moment it is admitted, not the engine's per-step snapshot.
"""
from __future__ import annotations

import secrets
from typing import Any

from kvmm_daemon import protocol as P
from kvmm_daemon.daemon.auth import PeerCredentials


def owner_of(engine_id: str) -> int:
    """The uid in a "<uid>:<name>" engine session id (root for any other shape)."""
    uid, sep, _ = engine_id.partition(":")
    return int(uid) if sep and uid.isdigit() else 0


def session_ref(who: PeerCredentials, engine_id: str) -> str:
    """How `who` names a session: the bare name if theirs, uid:name otherwise."""
    uid, _, name = engine_id.partition(":")
    return name if uid == str(who.uid) else engine_id


def resolve(who: PeerCredentials, ref: str) -> str:
    """The engine id of a session reference; PERMISSION_DENIED for another uid's unless root."""
    m = P.SESSION_REF_RE.match(ref)
    assert m is not None                  # parse_request checked the shape
    uid = int(m.group(1)) if m.group(1) is not None else who.uid
    if not who.may_access(uid):
        raise P.ProtocolError(P.ErrorCode.PERMISSION_DENIED,
                              f"session {ref} belongs to uid {uid}; only it or root may use it")
    return f"{uid}:{m.group(2)}"


class SessionDirectory:
    """Open, list and delete sessions on behalf of peers.

    Attributes: engine (holds the sessions), loop (its EngineLoop, for `barrier`),
    ledger (the SessionLedger counting sessions and stored bytes per uid).
    """

    def __init__(self, engine: Any, loop: Any, ledger: Any):
        self.engine = engine
        self.loop = loop
        self.ledger = ledger

    def all(self) -> list[dict[str, Any]]:
        return [{"session_id": s.session_id, "owner_uid": owner_of(s.session_id),
                 "num_tokens": s.num_tokens, "kv_resident": s.kv_resident, "busy": s.busy}
                for s in self.engine.list_sessions()]

    def visible(self, who: PeerCredentials) -> list[dict[str, Any]]:
        return [dict(s, session=session_ref(who, s["session_id"]))
                for s in self.all() if who.may_access(s["owner_uid"])]

    def _admit(self, uid: int, engine_id: str) -> None:
        """Count a new session of `uid` now (LIMIT_EXCEEDED when over its quota) and queue
        its opening in the engine."""
        why = self.ledger.room_for(uid)
        if why is not None:
            raise P.ProtocolError(P.ErrorCode.LIMIT_EXCEEDED, why)
        self.ledger.add(engine_id)
        self.engine.open_session(engine_id, owner=uid)

    async def open(self, who: PeerCredentials, name: str | None) -> str:
        name = name or f"s{secrets.token_hex(4)}"
        engine_id = f"{who.uid}:{name}"
        if engine_id in self.ledger or engine_id in {s["session_id"] for s in self.all()}:
            raise P.ProtocolError(P.ErrorCode.CONFLICT, f"session {name} already exists; "
                                  f"pick another name or delete it first")
        self._admit(who.uid, engine_id)
        await self.loop.barrier()
        return name

    def ensure(self, who: PeerCredentials, ref: str) -> str:
        """The engine id of `ref` for a generate, opening the session if it does not exist
        yet (as `kvmm run --session` does); the open is queued before the request, so the
        engine applies it first."""
        engine_id = resolve(who, ref)
        if engine_id not in self.ledger and engine_id not in {s["session_id"] for s in self.all()}:
            self._admit(owner_of(engine_id), engine_id)
        return engine_id

    async def delete(self, who: PeerCredentials, ref: str) -> None:
        engine_id = resolve(who, ref)
        if engine_id not in self.ledger and engine_id not in {s["session_id"] for s in self.all()}:
            raise P.ProtocolError(P.ErrorCode.NOT_FOUND, f"no session {ref}; list them with kvmm sessions ls")
        await self.drop(engine_id)

    async def drop(self, engine_id: str) -> None:
        """Delete a session in the engine (a running turn of it is aborted) and stop counting
        it; returns once the engine has applied it."""
        self.ledger.forget(engine_id)
        self.engine.delete_session(engine_id)
        await self.loop.barrier()

    async def imported(self, engine_id: str) -> None:
        """An import committed `engine_id` on flash: count it and list it in the engine at
        once (returns after the engine step that registers it)."""
        self.ledger.add(engine_id)
        self.engine.session_imported(engine_id)
        await self.loop.barrier()
