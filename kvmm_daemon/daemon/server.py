"""Server: the Unix-socket front of one engine — connections, operations, ownership, drain.

Each connection is one trio task reading frames; `generate` runs as a task of its own (so one
connection may stream several requests and cancel one of them), every other operation is
answered in order by the reader. Replies go out under a per-connection lock, so frames never
interleave. Identity is the peer's uid from SO_PEERCRED (auth.py); requests and sessions are
owned by uid and only their owner or root may see, cancel or delete them. A session's engine
id is "<uid>:<name>", so ownership survives restarts without a table: a client names its own
sessions by name, root names anybody's as "uid:name".

Failure containment: a bad frame or request gets an error reply and the connection goes on;
an oversized length prefix or a truncated frame closes that connection only; a client that
goes away (EOF, reset, broken pipe) has its requests aborted, which frees their KV blocks.
`drain` implements SIGTERM: refuse new work, give in-flight requests `grace_period_s`, abort
the rest, let their final frames go out.

Every front admits its generates through `Server.admit` (this msgpack server and the HTTP API
of openai_api.py alike), so limits, session ownership, draining, metrics and "leaving aborts
the request" are written once; a front only relays a `Generation`'s outputs in its own shape.

Prior art: vLLM's OpenAI server (streaming deltas, a final usage message), trio's
`serve_listeners` (EMFILE back-off). Left out: TCP and TLS on this socket (the HTTP API has
TCP with API keys), authentication beyond the uid.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterator

import trio

from kvmm_daemon import openmp_runtime
from kvmm_daemon import protocol as P
from kvmm_daemon.daemon.accept import accept_forever
from kvmm_daemon.daemon.auth import PeerCredentials, UidLimits, blocks_needed, peer_credentials
from kvmm_daemon.daemon.daemon_config import DaemonConfig
from kvmm_daemon.daemon.connection import Connection
from kvmm_daemon.daemon.engine_loop import ABORTED, EngineLoop
from kvmm_daemon.daemon.metrics import Metrics
from kvmm_daemon.daemon.quotas import SessionLedger
from kvmm_daemon.daemon.session_directory import SessionDirectory, owner_of, session_ref
from kvmm_daemon.engine.outputs import OutputAccumulator
from kvmm_daemon.engine.sampling_params import SamplingParams
from kvmm_daemon.errors import CapacityError, KvmmError, RequestError

log = logging.getLogger("kvmm.server")
try:
    __version__ = importlib.metadata.version("kvmm")
except importlib.metadata.PackageNotFoundError:   # running from a tree that is not installed
    __version__ = "unknown"
RECV_BYTES = 1 << 16
FINAL_FLUSH_S = 5.0


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    uid: int
    conn_id: int
    blocks: int                 # KV blocks reserved against the uid's limit
    prompt_tokens: int
    session: str | None         # engine session id
    started: float


@dataclass(slots=True, eq=False)
class Generation:
    """One admitted request as its front sees it: iterate it for the engine's outputs.

    Attributes:
      acc: every output taken so far, folded (iteration feeds it).
      finished: the engine reported the request done (an error counts); until then, leaving
        `Server.admit` aborts the request, which frees its blocks.
      aborted: the request was aborted (cancel, drain) before it finished.
      engine_stopped: the output channel closed without a final output (the engine loop
        failed); `finished` stays False.
      retire: forget the request in the server's tables (call before sending the final
        reply); idempotent.
      settle: for a session turn, awaited once the engine finished it: the turn's KV is then
        committed on flash (a reply means durable, and the view shows it).
    """
    request_id: str
    prompt_ids: list[int]
    outputs: trio.MemoryReceiveChannel
    acc: OutputAccumulator
    retire: Any
    metrics: Metrics
    last_t: float = dataclasses.field(default_factory=time.perf_counter)   # admission, then last token
    streamed: bool = False         # some token came out already
    finished: bool = False
    aborted: bool = False
    engine_stopped: bool = False
    settle: Any = None             # session turns: awaited before the final output is handed out

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Any:
        """The next RequestOutput; stops after the last, on abort (finish reasons become
        "abort") or when the engine loop stopped."""
        if self.finished or self.aborted or self.engine_stopped:
            raise StopAsyncIteration
        try:
            out = await self.outputs.receive()
        except trio.EndOfChannel:
            self.engine_stopped = True
            raise StopAsyncIteration from None
        if out is ABORTED:
            self.acc.abort()
            self.aborted = True
            raise StopAsyncIteration
        self.acc.take(out)
        self.finished = out.finished or out.error is not None
        if self.finished and self.settle is not None:
            await self.settle()       # the turn's write-through is on flash before the reply
        ntokens = max((len(d.token_ids) for d in out.deltas), default=0)
        if ntokens:
            now = time.perf_counter()
            self.metrics.observe_tokens(not self.streamed, now - self.last_t, ntokens)
            self.last_t, self.streamed = now, True
        return out


class Server:
    """Serves one engine on one listening socket.

    Attributes:
      records: request id -> RequestRecord; an entry exists iff a generate of that id was
        admitted (counted in `limits`) and its task has not ended.
      conns: connection id -> Connection for every open connection.
      draining: no new generate is accepted once set (SIGTERM received).
    """

    def __init__(self, cfg: DaemonConfig, engine: Any, *, block_size: int, kv_block_bytes: int = 0,
                 watchdog=lambda: None, ping_interval_s: float | None = None, view=None,
                 engine_in_caller_thread: bool = False):
        self.cfg = cfg
        self.view = view              # the swapfs view's ViewStatus, shown in stats
        self.engine = engine
        self.block_size = block_size
        self.loop = EngineLoop(engine, watchdog=watchdog, ping_interval_s=ping_interval_s,
                               own_thread=not engine_in_caller_thread,
                               admit_wait_s=cfg.admit_wait_ms / 1000)
        self.metrics = Metrics(lambda: self.engine.statistics().as_dict())
        self.limits = UidLimits(cfg.max_requests_per_uid, cfg.max_kv_blocks_per_uid)
        self.quotas = SessionLedger(engine, lambda: self.loop.statistics().steps,
                                    max_sessions=cfg.max_sessions_per_uid,
                                    quota_bytes=getattr(getattr(engine, "cfg", None), "swap_quota_per_uid", None),
                                    block_bytes=kv_block_bytes, block_size=block_size)
        self.sessions = SessionDirectory(engine, self.loop, self.quotas)
        self.records: dict[str, RequestRecord] = {}   # listed and cancellable requests
        self.handlers = 0      # generate handlers running (a retired request may still be replying)
        self.conns: dict[int, Connection] = {}
        self._replies_closed = [0, 0]       # frames, writes of connections already gone
        self.draining = False
        self.started = time.monotonic()
        self.errors: Counter[str] = Counter()
        self.requests_total = 0
        self._request_ids = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self._records_changed = trio.Event()
        self._accepting: trio.CancelScope | None = None
        # request type -> handler(who, request) -> result; generate runs as a task of its own
        self._operations: dict[type, Any] = {
            P.HealthRequest: self._health, P.StatsRequest: self._stats, P.ListRequestsRequest: self._requests,
            P.CancelRequest: self._cancel, P.SessionOpenRequest: self._session_open,
            P.SessionListRequest: self._session_list, P.SessionDeleteRequest: self._session_delete,
            P.StepsRequest: self._steps}

    # ------------------------------------------------------------------ accepting

    async def serve(self, listener: trio.SocketListener, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until `stop_accepting`; each runs in this task's nursery."""
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as self._accepting:
                task_status.started()
                await accept_forever(listener, self._handle, nursery)

    def stop_accepting(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()

    def _replies(self) -> dict[str, int]:
        """Reply frames and the socket writes that carried them (batched per connection)."""
        frames = self._replies_closed[0] + sum(c.frames for c in self.conns.values())
        writes = self._replies_closed[1] + sum(c.writes for c in self.conns.values())
        return {"frames": frames, "writes": writes}

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            creds = peer_credentials(stream.socket)
        except OSError as exc:
            log.warning("dropping a client whose credentials cannot be read: %s", exc)
            await stream.aclose()
            return
        conn = Connection(next(self._conn_ids), stream, creds)
        if len(self.conns) >= self.cfg.max_clients:
            self.errors[P.ErrorCode.LIMIT_EXCEEDED.value] += 1
            with trio.move_on_after(1):
                await conn.try_send(P.error_reply(None, P.ErrorCode.LIMIT_EXCEEDED,
                                f"the daemon serves {self.cfg.max_clients} clients already "
                                f"(max_clients); retry later"))
            await stream.aclose()
            return
        self.conns[conn.id] = conn
        log.debug("client %d connected: pid %d uid %d", conn.id, creds.pid, creds.uid)
        try:
            async with trio.open_nursery() as nursery:
                await self._read_loop(conn, nursery)
                nursery.cancel_scope.cancel()     # peer gone: end its streams (aborts requests)
        finally:
            conn.closed = True
            del self.conns[conn.id]
            self._replies_closed[0] += conn.frames
            self._replies_closed[1] += conn.writes
            with trio.CancelScope(shield=True):
                await stream.aclose()
            log.debug("client %d disconnected", conn.id)

    async def _read_loop(self, conn: Connection, nursery: trio.Nursery) -> None:
        decoder = P.FrameDecoder(self.cfg.max_frame_bytes)
        while True:
            try:
                data = await conn.stream.receive_some(RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                if decoder.pending:
                    log.info("client %d closed mid-frame (%d bytes); dropping it", conn.id, decoder.pending)
                return
            try:
                bodies = decoder.feed(data)
            except P.ProtocolError as exc:            # oversized: cannot resynchronise
                self.errors[exc.code.value] += 1
                log.info("client %d: %s; closing", conn.id, exc.message)
                with trio.move_on_after(1):
                    await conn.try_send(P.error_reply(None, exc.code, exc.message))
                return
            for body in bodies:
                try:
                    req = P.parse_request(P.decode_body(body), make_params=SamplingParams.from_dict)
                except P.ProtocolError as exc:
                    self.errors[exc.code.value] += 1
                    if not await conn.try_send(P.error_reply(exc.id, exc.code, exc.message)):
                        return
                    continue
                if type(req) is P.GenerateRequest:
                    nursery.start_soon(self._generate_task, conn, req)
                elif not await conn.try_send(await self._answer(conn, req)):
                    return

    # ------------------------------------------------------------------ operations

    async def _answer(self, conn: Connection, req: P.Request) -> dict[str, Any]:
        """The reply to any operation but generate; errors become error replies."""
        try:
            result = await self._operations[type(req)](conn.creds, req)
        except P.ProtocolError as exc:
            self.errors[exc.code.value] += 1
            return P.error_reply(req.id, exc.code, exc.message)
        except KvmmError as exc:
            self.errors[P.ErrorCode.CONFLICT.value] += 1
            return P.error_reply(req.id, P.ErrorCode.CONFLICT, str(exc))
        return P.reply(req.id, "result", result=result)

    async def _health(self, who: PeerCredentials, req: P.HealthRequest) -> dict[str, Any]:
        return {"status": "draining" if self.draining else "ok", "version": __version__,
                "protocol": P.PROTOCOL_VERSION, "uptime_s": round(time.monotonic() - self.started, 3),
                "uid": who.uid}

    async def _stats(self, who: PeerCredentials, req: P.StatsRequest) -> dict[str, Any]:
        return await self.stats(who)

    async def _steps(self, who: PeerCredentials, req: P.StepsRequest) -> dict[str, Any]:
        return self.engine.step_trace()       # a copy of the kept steps: no lock needed

    async def _requests(self, who: PeerCredentials, req: P.ListRequestsRequest) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"request_id": r.request_id, "uid": r.uid, "prompt_tokens": r.prompt_tokens,
                 "session": session_ref(who, r.session) if r.session else None,
                 "age_s": round(now - r.started, 3)}
                for r in self.records.values() if who.may_access(r.uid)]

    async def _cancel(self, who: PeerCredentials, req: P.CancelRequest) -> dict[str, Any]:
        record = self.records.get(req.request_id)
        if record is None:
            raise P.ProtocolError(P.ErrorCode.NOT_FOUND,
                                  f"no request {req.request_id} in flight (it finished or never existed)")
        if not who.may_access(record.uid):
            raise P.ProtocolError(P.ErrorCode.PERMISSION_DENIED,
                                  f"request {req.request_id} belongs to another uid; only its owner or root may cancel it")
        self.loop.abort(req.request_id)
        return {"cancelled": req.request_id}

    async def _session_open(self, who: PeerCredentials, req: P.SessionOpenRequest) -> dict[str, Any]:
        return {"session": await self.sessions.open(who, req.session)}

    async def _session_list(self, who: PeerCredentials, req: P.SessionListRequest) -> list[dict[str, Any]]:
        return self.sessions.visible(who)

    async def _session_delete(self, who: PeerCredentials, req: P.SessionDeleteRequest) -> dict[str, Any]:
        await self.sessions.delete(who, req.session)
        return {"deleted": req.session}

    async def stats(self, who: PeerCredentials) -> dict[str, Any]:
        engine_stats = self.engine.statistics().as_dict()     # a snapshot: no lock needed
        engine_stats["sessions"] = [
            dict(s, session=session_ref(who, s["session_id"]))
            for s in engine_stats.get("sessions", []) if who.may_access(owner_of(s["session_id"]))]
        limits = self.limits.statistics().as_dict()
        if not who.is_root:
            limits["usage"] = [u for u in limits["usage"] if u["uid"] == who.uid]
        by_uid = Counter(c.creds.uid for c in self.conns.values())
        return {**engine_stats, "openmp": openmp_runtime.status(),
                "clients": {"connected": len(self.conns),
                            "by_uid": {str(u): n for u, n in sorted(by_uid.items()) if who.may_access(u)}},
                "server": {"uptime_s": round(time.monotonic() - self.started, 3),
                           "draining": self.draining, "requests_total": self.requests_total,
                           "requests_in_flight": len(self.records),
                           "replies": self._replies(),
                           "errors": dict(self.errors), "limits": limits,
                           "engine_loop": dataclasses.asdict(self.loop.statistics()),
                           "view": self.view.statistics() if self.view is not None else None}}

    # ------------------------------------------------------------------ generate

    async def _generate_task(self, conn: Connection, req: P.GenerateRequest) -> None:
        try:
            await self._generate(conn, req)
        except P.ProtocolError as exc:           # counted by admit
            await conn.try_send(P.error_reply(req.id, exc.code, exc.message))
        except trio.BrokenResourceError:
            pass                                   # peer gone; _generate aborted the request

    async def _generate(self, conn: Connection, req: P.GenerateRequest) -> None:
        messages = None if req.messages is None else [{"role": r, "content": c} for r, c in req.messages]
        async with self.admit(conn.creds, params=req.params, prompt=req.prompt, messages=messages,
                              token_ids=req.token_ids, raw=req.raw, session=req.session,
                              conn_id=conn.id) as gen:
            await conn.send(P.reply(req.id, "accepted", request_id=gen.request_id,
                                    prompt_tokens=len(gen.prompt_ids)))
            await self._stream(conn, req, gen)

    @contextlib.asynccontextmanager
    async def admit(self, who: PeerCredentials, *, params: SamplingParams, prompt: str | None = None,
                    messages: list[dict[str, str]] | None = None, token_ids=None, raw: bool = False,
                    session: str | None = None, conn_id: int = 0) -> AsyncIterator[Generation]:
        """Admit one generate of `who` and submit it to the engine; yields its Generation.

        Every front (msgpack, HTTP) goes through here, so limits, ownership and draining are
        the same for all. ProtocolError when refused. On exit the request is aborted unless
        the consumer saw it finish (`gen.finished`), and retired either way."""
        try:
            prompt_ids, session_id, blocks = await self._admission(
                who, params, prompt, messages, token_ids, raw, session)
        except P.ProtocolError as exc:
            self.refused(exc.code)
            raise
        request_id = f"r{next(self._request_ids)}"
        self.handlers += 1
        self.records[request_id] = RequestRecord(request_id, who.uid, conn_id, blocks,
                                                 len(prompt_ids), session_id, time.monotonic())
        self.requests_total += 1
        gen = None
        try:
            try:
                outputs = self.loop.submit(request_id, prompt_ids, params, session_id, owner=who.uid)
            except (CapacityError, RequestError) as exc:
                code = P.ErrorCode.CAPACITY if isinstance(exc, CapacityError) else P.ErrorCode.INVALID_REQUEST
                self.refused(code)
                raise P.ProtocolError(code, str(exc)) from None
            gen = Generation(request_id, prompt_ids, outputs, OutputAccumulator(params.num_choices),
                             functools.partial(self._retire, request_id), self.metrics,
                             settle=(functools.partial(self.loop.barrier, settle=True)
                                     if session_id is not None else None))
            yield gen
        finally:
            finished = gen is not None and gen.finished
            if gen is not None:
                self._observe_end(gen)
            if not finished:
                self.loop.abort(request_id)
            log.debug("%s uid %d: %d prompt tokens, %s", request_id, who.uid, len(prompt_ids),
                      "done" if finished else "aborted (client gone)")
            self._retire(request_id)
            self.handlers -= 1
            self._records_changed.set()

    async def _admission(self, who: PeerCredentials, params: SamplingParams, prompt: str | None,
                         messages: list[dict[str, str]] | None, token_ids, raw: bool,
                         session: str | None) -> tuple[list[int], str | None, int]:
        """Checks before a request exists: draining, the session, the prompt, the uid's
        limits (its KV blocks reserved here, released by _retire). ProtocolError when refused."""
        if self.draining:
            raise P.ProtocolError(P.ErrorCode.SHUTTING_DOWN, "the daemon is shutting down; retry after it restarts")
        session_id = self.sessions.ensure(who, session) if session else None
        try:
            prompt_ids = await trio.to_thread.run_sync(lambda: self.engine.encode_prompt(
                text=prompt, messages=messages,
                token_ids=None if token_ids is None else list(token_ids), raw=raw,
                session_id=session_id))
        except RequestError as exc:
            raise P.ProtocolError(P.ErrorCode.INVALID_REQUEST, str(exc)) from None
        blocks = blocks_needed(len(prompt_ids), params.max_tokens, params.num_choices, self.block_size)
        if session_id is not None:          # the turn grows the session stored on flash
            why = self.quotas.room_for(owner_of(session_id), 0, blocks * self.quotas.block_bytes)
            if why is not None:
                raise P.ProtocolError(P.ErrorCode.LIMIT_EXCEEDED, why)
        self.limits.admit(who.uid, blocks)
        return prompt_ids, session_id, blocks

    def refused(self, code: P.ErrorCode) -> None:
        """Count a request refused or failed with `code` (stats and metrics)."""
        self.errors[code.value] += 1
        self.metrics.refused.labels(code.value).inc()

    def _observe_end(self, gen: Generation) -> None:
        last = gen.acc.last
        if last is not None and last.error is not None:
            self.refused(P.ErrorCode.ENGINE_ERROR)
            return
        usage = gen.acc.usage(len(gen.prompt_ids))
        self.metrics.observe_end(gen.acc.finish_reasons, usage.prompt_tokens, usage.cached_prompt_tokens, usage.completion_tokens)

    def _retire(self, request_id: str) -> None:
        """Forget a request and release its reservation (idempotent). Called before its final
        reply is sent, so a client that reads the reply never finds it still listed."""
        rec = self.records.pop(request_id, None)
        if rec is not None:
            self.limits.release(rec.uid, rec.blocks)
            self._records_changed.set()

    async def _stream(self, conn: Connection, req: P.GenerateRequest, gen: Generation) -> None:
        """Relay one request's outputs as msgpack replies."""
        request_id, acc = gen.request_id, gen.acc
        async for out in gen:
            if out.error is not None:
                gen.retire()
                await conn.send(P.error_reply(req.id, P.ErrorCode.ENGINE_ERROR, out.error))
                return
            if req.stream and any(d.token_ids or d.text for d in out.deltas):
                await conn.send(P.reply(req.id, "delta", request_id=request_id,
                                        choices=[P.delta_choice(d) for d in out.deltas]))
        if gen.engine_stopped:
            await conn.send(P.error_reply(req.id, P.ErrorCode.INTERNAL, "the engine stopped; see the daemon log"))
            return
        gen.retire()
        await conn.send(P.reply(
            req.id, "done", request_id=request_id,
            choices=[P.final_choice(c) for c in acc.choices()], prompt_token_ids=gen.prompt_ids,
            usage=dataclasses.asdict(acc.usage(len(gen.prompt_ids))),
            timings=dataclasses.asdict(acc.timings())))

    # ------------------------------------------------------------------ shutdown

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests, wait up to grace_s for in-flight ones, abort the rest."""
        self.draining = True
        self.stop_accepting()
        log.info("draining: %d requests in flight, grace period %.1f s", len(self.records), grace_s)
        with trio.move_on_after(grace_s):
            await self._wait_records_empty()
        if self.records:
            log.warning("grace period over: cancelling %d requests", len(self.records))
            for request_id in list(self.records):
                self.loop.abort(request_id)
            with trio.move_on_after(FINAL_FLUSH_S):
                await self._wait_records_empty()

    async def _wait_records_empty(self) -> None:
        """Until every generate handler has sent its last reply."""
        while self.handlers:
            self._records_changed = trio.Event()
            await self._records_changed.wait()


def open_trio_listener(sock) -> trio.SocketListener:
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))

