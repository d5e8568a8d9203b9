"""SessionDirectory: per-uid session names over the engine's flat session ids.

A session's engine id is "<uid>:<name>", so two apps may both call their session "chat", and
ownership is part of the id: it survives a daemon restart (sessions restored from flash keep
their owner) without a table. A client names its own sessions by bare name; root may name
anybody's as "uid:name", and lists show other uids' sessions that way.

Mechanism only: the engine stores and applies sessions (opening and deleting are queued and
take effect at its next step; `EngineLoop.barrier` waits for that), this module resolves
names, checks ownership and the per-uid count.
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
    max_per_uid (sessions one uid may have open).
    """

    def __init__(self, engine: Any, loop: Any, max_per_uid: int):
        self.engine = engine
        self.loop = loop
        self.max_per_uid = max_per_uid

    def all(self) -> list[dict[str, Any]]:
        return [{"session_id": s.session_id, "owner_uid": owner_of(s.session_id),
                 "num_tokens": s.num_tokens, "kv_resident": s.kv_resident, "busy": s.busy}
                for s in self.engine.list_sessions()]

    def visible(self, who: PeerCredentials) -> list[dict[str, Any]]:
        return [dict(s, session=session_ref(who, s["session_id"]))
                for s in self.all() if who.may_access(s["owner_uid"])]

    def _check_room(self, uid: int, sessions: list[dict[str, Any]]) -> None:
        held = sum(s["owner_uid"] == uid for s in sessions)
        if held >= self.max_per_uid:
            raise P.ProtocolError(P.ErrorCode.LIMIT_EXCEEDED,
                                  f"uid {uid} has {held} sessions open, the limit "
                                  f"(max_sessions_per_uid); delete one with kvmm sessions rm ID")

    async def open(self, who: PeerCredentials, name: str | None) -> str:
        sessions = self.all()
        self._check_room(who.uid, sessions)
        name = name or f"s{secrets.token_hex(4)}"
        engine_id = f"{who.uid}:{name}"
        if engine_id in {s["session_id"] for s in sessions}:
            raise P.ProtocolError(P.ErrorCode.CONFLICT, f"session {name} already exists; "
                                  f"pick another name or delete it first")
        self.engine.open_session(engine_id, owner=who.uid)
        await self.loop.barrier()
        return name

    def ensure(self, who: PeerCredentials, ref: str) -> str:
        """The engine id of `ref` for a generate, opening the session if it does not exist
        yet (as `kvmm run --session` does); the open is queued before the request, so the
        engine applies it first."""
        engine_id = resolve(who, ref)
        sessions = self.all()
        if engine_id not in {s["session_id"] for s in sessions}:
            uid = owner_of(engine_id)
            self._check_room(uid, sessions)
            self.engine.open_session(engine_id, owner=uid)
        return engine_id

    async def delete(self, who: PeerCredentials, ref: str) -> None:
        engine_id = resolve(who, ref)
        if engine_id not in {s["session_id"] for s in self.all()}:
            raise P.ProtocolError(P.ErrorCode.NOT_FOUND, f"no session {ref}; list them with kvmm sessions ls")
        self.engine.delete_session(engine_id)
        await self.loop.barrier()
