"""OpenAIApi: the OpenAI-compatible HTTP API as a Starlette app over the daemon's Server.

Routes: POST /v1/chat/completions, POST /v1/completions (JSON or server-sent events ending in
`data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus). Every generate goes
through `Server.admit`, the path the msgpack protocol takes, so per-uid limits, session
ownership, draining and "a client that leaves frees its blocks" hold alike for both.

Identity: http_server.py puts the connection's identity in the ASGI scope's state
(`scope["state"]["peer"]`): on the Unix socket it is the peer's SO_PEERCRED and an
Authorization header is ignored (the openai client always sends one); on TCP it is None and
the request must carry `Authorization: Bearer KEY` with a key of `http_api_keys`, which acts
as the uid the key maps to. GET /health needs no key.

Disconnects: a streaming response (sse_response.py) and a non-streaming one alike watch
`receive()` for http.disconnect; either way leaving `Server.admit` aborts the request, which
frees its KV blocks at the engine's next step.

Prior art: vLLM's `entrypoints/openai`; the shapes of the replies are completion_shape.py's.
Left out: see openai_requests.py.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import time
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvmm_daemon import protocol as P
from kvmm_daemon.daemon.auth import PeerCredentials
from kvmm_daemon.daemon.completion_shape import CompletionShape
from kvmm_daemon.daemon.metrics import CONTENT_TYPE
from kvmm_daemon.daemon.openai_requests import ApiError, parse_completion
from kvmm_daemon.daemon.sse_response import SseResponse, cancel_on_disconnect

log = logging.getLogger("kvmm.http")
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"


def model_id(model_path: str | None) -> str:
    """The id /v1/models lists: the model file's or directory's name without extension."""
    if not model_path:
        return EMBEDDED_MODEL_ID
    name = os.path.basename(os.path.normpath(model_path))
    return name[:-5] if name.endswith(".gguf") else name


class OpenAIApi:
    """The routes over one Server.

    Attributes: server (admission and the engine), model (the one id served),
    api_keys (key -> uid for TCP peers), max_body (largest request body, bytes).
    """

    def __init__(self, server: Any, *, model: str, api_keys: dict[str, int], max_body: int):
        self.server = server
        self.model = model
        self.api_keys = dict(api_keys)
        self.max_body = max_body
        self.created = int(time.time())

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def _not_found(self, request: Request, exc: Exception) -> JSONResponse:
        return self.error(ApiError(404, f"no route {request.url.path}; see GET /v1/models, POST "
                                        f"/v1/chat/completions, POST /v1/completions",
                                   type="not_found_error", code="not_found"))

    async def _not_allowed(self, request: Request, exc: Exception) -> JSONResponse:
        return self.error(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                   code="method_not_allowed"))

    def who(self, request: Request) -> PeerCredentials:
        """The caller: the Unix peer, or the uid of a TCP caller's bearer key (401 without)."""
        peer = request.scope.get("state", {}).get("peer")
        if peer is not None:
            return peer
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip().encode()
        if scheme.lower() == "bearer" and key:
            for known, uid in self.api_keys.items():
                if hmac.compare_digest(known.encode(), key):
                    return PeerCredentials(pid=0, uid=uid, gid=-1)
        raise ApiError(401, "a valid API key is required on TCP: send Authorization: Bearer KEY "
                            "with a key from daemon.http_api_keys (or use the Unix socket)",
                       type="authentication_error", code="invalid_api_key")

    async def _json_body(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {self.max_body} "
                                f"(daemon.max_frame_bytes)", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"request body exceeds the limit of {self.max_body} bytes "
                                    f"(daemon.max_frame_bytes)", code="body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    # ------------------------------------------------------------------ simple routes

    async def health(self, request: Request) -> JSONResponse:
        draining = self.server.draining
        return JSONResponse({"status": "draining" if draining else "ok", "model": self.model},
                            status_code=503 if draining else 200)

    async def models(self, request: Request) -> JSONResponse:
        try:
            self.who(request)
        except ApiError as exc:
            return self.error(exc)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": self.created, "owned_by": "kvmm",
             "max_model_len": self.server.engine.cfg.max_model_len}]})

    async def metrics(self, request: Request) -> Response:
        try:
            self.who(request)
        except ApiError as exc:
            return self.error(exc)
        body = await trio.to_thread.run_sync(self.server.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ completions

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, *, chat: bool) -> Response:
        stack = contextlib.AsyncExitStack()
        try:
            who = self.who(request)
            req = parse_completion(await self._json_body(request), chat=chat)
            if req.model != self.model:
                raise ApiError(404, f"the model {req.model!r} does not exist; this daemon serves "
                                    f"{self.model!r} (GET /v1/models)", type="not_found_error",
                               param="model", code="model_not_found")
            if req.user:
                log.debug("uid %d request for user %r", who.uid, req.user)
            try:
                gen = await stack.enter_async_context(self.server.admit(
                    who, params=req.params, prompt=req.prompt, messages=req.messages,
                    token_ids=req.token_ids, raw=not chat, session=req.session))
            except P.ProtocolError as exc:
                raise ApiError.from_protocol(
                    exc, "kvmm_session" if exc.code in (P.ErrorCode.PERMISSION_DENIED, P.ErrorCode.CONFLICT)
                    else None) from None
        except ApiError as exc:
            await stack.aclose()
            return self.error(exc)
        except ClientDisconnect:
            await stack.aclose()
            return Response(status_code=499)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stack.aclose()
            raise
        shape = CompletionShape(req, gen.request_id, self.model, self.server.engine.tokenizer)
        if req.stream:
            return SseResponse(shape.events(gen), stack)
        async with stack:
            return await self._whole(request, shape, gen)

    async def _whole(self, request: Request, shape: CompletionShape, gen: Any) -> Response:
        """Run to the end and answer once; a client that leaves meanwhile aborts it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_disconnect, request.receive, nursery.cancel_scope)
            async for _ in gen:
                pass
            nursery.cancel_scope.cancel()
        if not (gen.finished or gen.aborted):
            return Response(status_code=499)            # nobody is listening any more
        error = shape.engine_error(gen)
        if error is not None:
            return self.error(error)
        gen.retire()
        return JSONResponse(shape.whole(gen))
