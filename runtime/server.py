"""An OpenAI-compatible HTTP server for one bundle (`edgeq serve BUNDLE`), on FastAPI and uvicorn.

    /v1/chat/completions, /v1/completions    decoder bundles, whole or streamed (server-sent events)
    /v1/embeddings                           encoder bundles
    /v1/models, /health

It serves with the runtime only (no compiler), so a device that has `edgeq[runtime,serve]` runs it:
`python -c "from edgeq.runtime.server import serve; serve('out/')"`.

One worker thread owns the loaded bundle and runs requests one at a time, in arrival order, so outputs never
mix. Requests wait in a bounded queue (`queue_size`); past it the server answers 503 at once, as a busy
OpenAI endpoint does, instead of letting waits grow without bound. A streamed request whose client goes away
is stopped at its next token. Errors are OpenAI's error objects: 400 for a request that cannot be served as
asked (a bad field, a prompt longer than the context), 401 without the API key, 404 for an unknown model or
path, 413 for a body over 16 MiB, 503 when the queue is full, 500 for a failure of the server itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
import queue
import secrets
import socket
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from edgeq import __version__
from edgeq.core.errors import EdgeqError, RequestError
from edgeq.runtime.openai_protocol import (
    MAX_CHOICES,
    ChatRequest,
    Choice,
    CompletionRequest,
    EmbeddingRequest,
    GenerationRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    usage_chunk,
)
from edgeq.runtime.sampling import MAX_SEED

DEFAULT_QUEUE = 16
MAX_BODY_BYTES = 16 << 20


class Busy(Exception):
    """The queue is full."""


# What a job sends back to its request, in order: per choice Start, Piece..., End; then Done (or Failed).
@dataclass
class Start:
    index: int
    prompt_index: int


@dataclass
class Piece:
    index: int
    text: str


@dataclass
class End:
    index: int
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Vectors:
    embeddings: np.ndarray
    n_tokens: int


@dataclass
class Done:
    pass


@dataclass
class Failed:
    status: int
    body: dict[str, Any]


@dataclass
class Job:
    """A request's work, run on the worker thread; what it produces goes back to the request's event loop."""

    work: Callable[[Any, Callable[[Any], None], Callable[[], bool]], None]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    """One thread owns the session; jobs run one at a time from a bounded FIFO queue."""

    def __init__(self, session, queue_size: int):
        self.session = session
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.current: Job | None = None
        self.thread = threading.Thread(target=self._loop, name="edgeq-serve", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy from None

    @property
    def busy(self) -> bool:
        return self.current is not None

    def stop(self) -> None:
        """Cancel what runs and what waits, then end the thread."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.emit(Failed(503, error_body("the server is stopping", "server_error", code="cancelled")))
        current = self.current
        if current is not None:
            current.cancelled.set()
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():          # its client left, or the server is stopping
                job.emit(Failed(503, error_body("the request was cancelled", "server_error", code="cancelled")))
                continue
            self.current = job
            try:
                job.work(self.session, job.emit, job.cancelled.is_set)
                job.emit(Done())
            except RequestError as exc:
                job.emit(Failed(400, error_body(str(exc), param=exc.param, code=exc.code)))
            except EdgeqError as exc:
                job.emit(Failed(400, error_body(str(exc))))
            except Exception as exc:            # a failure of the server, not of the request: say so and go on
                traceback.print_exc(file=sys.stderr)
                job.emit(Failed(500, error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")))
            finally:
                self.current = None


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(session, model_id: str, *, aliases: tuple[str, ...] = (), api_key: str | None = None,
               queue_size: int = DEFAULT_QUEUE, defaults: dict[str, Any] | None = None) -> FastAPI:
    """The server's ASGI app for a loaded bundle (a decoder `Session`, or an encoder session with `embed`).

    `defaults`: sampling settings for fields a request leaves out (SamplingParams names). A decoder request may
    name the bundle's separate LoRA adapters to apply (`"adapters": {"NAME": WEIGHT}` or `["NAME[:WEIGHT]"]`,
    `{}`: the base); one that leaves them out gets those the session was loaded with. Requests run one at a time,
    so each switches the session (no reload) before it generates."""
    if queue_size < 1:
        raise EdgeqError(None, f"queue size {queue_size} must be at least 1")
    decoder = hasattr(session, "stream")
    encoder = hasattr(session, "embed") and getattr(session, "kind", None) == "encoder"
    if not decoder and not encoder:
        raise EdgeqError(getattr(session, "bundle", None), "edgeq serve needs a decoder or encoder bundle")
    defaults = dict(defaults or {})
    default_adapters = dict(session.adapters) if decoder else {}
    worker = Worker(session, queue_size)
    fingerprint = f"edgeq-{__version__}-{session.backend_name}"
    names = {model_id, *aliases}
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()

    app = FastAPI(title="edgeq", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.worker = worker

    @app.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            # the body is JSON whatever the client labels it (`curl -d` says form data), as llama-server reads it
            request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"] + \
                [(b"content-type", b"application/json")]
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
        return _error(400, f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}",
                      param=where[0] if where else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    def check_model(name: str | None) -> JSONResponse | None:
        if name is not None and name not in names:
            return _error(404, f"the model {name!r} does not exist; this server serves {model_id!r}", param="model",
                          code="model_not_found")
        return None

    async def run(work) -> tuple[Job, JSONResponse | None]:
        job = Job(work, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except Busy:
            return job, _error(503, f"the server is busy: {queue_size} requests are waiting; try again",
                               "server_error", code="server_busy")
        return job, None

    async def events(job: Job) -> AsyncIterator[Any]:
        while True:
            ev = await job.events.get()
            yield ev
            if isinstance(ev, (Done, Failed)):
                return

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "backend": session.backend_name, "busy": worker.busy,
                "queued": worker.jobs.qsize()}

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "edgeq",
                "backend": session.backend_name, "kind": "decoder" if decoder else "encoder",
                **({"n_ctx": session.n_ctx, "adapters": sorted(session.available_adapters),
                    "default_adapters": default_adapters} if decoder else {})}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        return check_model(name) or model_card()

    def generation_work(req: GenerationRequest, prompts: list, chat: bool):
        """The job for a completion request: each prompt n times (seed, seed + 1, ...), pieces as they come."""
        req.refuse_unsupported()
        stops = req.stops()
        if len(prompts) * req.n > MAX_CHOICES:
            raise RequestError(f"{len(prompts)} prompts x n {req.n} choices; at most {MAX_CHOICES}", param="n")
        sampling = req.sampling(defaults)
        try:
            adapters = default_adapters if req.adapters is None else session.resolve_adapters(req.adapters)
        except EdgeqError as exc:
            raise RequestError(str(exc), param="adapters") from None
        seed = sampling.get("seed")
        if seed is None:
            seed = secrets.randbelow(MAX_SEED - MAX_CHOICES)

        def work(s, emit, cancelled):
            s.set_adapters(adapters)
            limit = req.limit()
            for p, prompt in enumerate(prompts):
                for j in range(req.n):
                    index = p * req.n + j
                    c = s.stream(prompt, limit if limit is not None else s.n_ctx, chat=chat, stop=stops,
                                 truncate=req.truncate, **{**sampling, "seed": (seed + index) % (MAX_SEED + 1)})
                    emit(Start(index, p))
                    if not chat and getattr(req, "echo", False):
                        emit(Piece(index, prompt if isinstance(prompt, str) else s.detokenize(prompt)))
                    for piece in c:
                        if cancelled():
                            c.close()
                            return
                        emit(Piece(index, piece))
                    emit(End(index, c.finish_reason, c.prompt_tokens, c.completion_tokens))
        return work

    async def respond(req: GenerationRequest, prompts: list, chat: bool):
        if not decoder:
            return _error(400, "this bundle is an encoder: it serves /v1/embeddings only", param="model")
        bad = check_model(req.model)
        if bad is not None:
            return bad
        try:
            work = generation_work(req, prompts, chat)
        except RequestError as exc:
            return _error(400, str(exc), param=exc.param, code=exc.code)
        job, busy = await run(work)
        if busy is not None:
            return busy
        rid = new_id("chatcmpl" if chat else "cmpl")
        stream = events(job)
        first = await stream.__anext__()          # errors found before generating are a plain error response
        if isinstance(first, Failed):
            return JSONResponse(first.body, status_code=first.status)
        if not req.stream:
            texts: dict[int, list[str]] = {}
            choices: list[Choice] = []
            prompt_of: dict[int, int] = {}
            async for ev in _chain(first, stream):
                if isinstance(ev, Start):
                    prompt_of[ev.index] = ev.prompt_index
                elif isinstance(ev, Piece):
                    texts.setdefault(ev.index, []).append(ev.text)
                elif isinstance(ev, End):
                    choices.append(Choice(ev.index, prompt_of[ev.index], "".join(texts.get(ev.index, [])),
                                          ev.finish_reason, ev.prompt_tokens, ev.completion_tokens))
                elif isinstance(ev, Failed):
                    return JSONResponse(ev.body, status_code=ev.status)
            build = chat_response if chat else completion_response
            return build(rid, model_id, choices, fingerprint)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int, text: str | None, finish_reason: str | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
                return _sse(chat_chunk(rid, model_id, fingerprint, index, delta, finish_reason))
            return _sse(completion_chunk(rid, model_id, fingerprint, index, text or "", finish_reason))

        async def sse() -> AsyncIterator[str]:
            choices: list[Choice] = []
            prompt_of: dict[int, int] = {}
            try:
                async for ev in _chain(first, stream):
                    if isinstance(ev, Start):
                        prompt_of[ev.index] = ev.prompt_index
                        if chat:
                            yield chunk(ev.index, None)           # the assistant's role comes first
                    elif isinstance(ev, Piece):
                        yield chunk(ev.index, ev.text)
                    elif isinstance(ev, End):
                        choices.append(Choice(ev.index, prompt_of[ev.index], "", ev.finish_reason, ev.prompt_tokens,
                                              ev.completion_tokens))
                        yield chunk(ev.index, "", ev.finish_reason)
                    elif isinstance(ev, Failed):
                        yield _sse(ev.body)
                        return
                if include_usage:
                    yield _sse(usage_chunk(rid, model_id, "chat.completion.chunk" if chat else "text_completion",
                                           fingerprint, choices))
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()           # the client went away, or the stream ended: stop generating

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        return await respond(req, [req.messages], chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        try:
            prompts = req.prompts()
        except RequestError as exc:
            return _error(400, str(exc), param=exc.param)
        return await respond(req, prompts, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        bad = check_model(req.model)
        if bad is not None:
            return bad
        if not encoder:
            return _error(400, "this bundle is a decoder: embeddings need an encoder bundle", param="model")
        if req.encoding_format not in ("float", "base64"):
            return _error(400, f"encoding_format {req.encoding_format!r}: float or base64", param="encoding_format")
        try:
            inputs = req.inputs()
        except RequestError as exc:
            return _error(400, str(exc), param=exc.param)

        def work(s, emit, cancelled):
            ids = [s.tokenize(x) if isinstance(x, str) else x for x in inputs]
            vectors = s.embed_ids(ids) if len(ids) <= 32 else np.concatenate(
                [s.embed_ids(ids[i:i + 32]) for i in range(0, len(ids), 32)])
            if req.dimensions is not None and req.dimensions != vectors.shape[1]:
                raise RequestError(f"dimensions {req.dimensions}: this model's embeddings have {vectors.shape[1]}",
                                   param="dimensions")
            emit(Vectors(np.asarray(vectors, np.float32), sum(len(x) for x in ids)))

        job, busy = await run(work)
        if busy is not None:
            return busy
        async for ev in events(job):
            if isinstance(ev, Failed):
                return JSONResponse(ev.body, status_code=ev.status)
            if isinstance(ev, Vectors):
                vectors, n_tokens = ev.embeddings, ev.n_tokens
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                               else [float(x) for x in v])} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": model_id,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return app


async def _chain(first, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for ev in rest:
        yield ev


def serve(bundle: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080, *, api_key: str | None = None,
          queue_size: int = DEFAULT_QUEUE, model_name: str | None = None, backend: str | None = None,
          threads: int | None = None, n_ctx: int | None = None, device: str | None = None,
          defaults: dict[str, Any] | None = None, log: Callable[[str], None] | None = None,
          adapters=None) -> None:
    """Load `bundle` and serve it until interrupted. `port` 0 takes a free port; the address actually bound is
    logged once the socket is open (`edgeq: serving MODEL at http://HOST:PORT/v1`). `adapters`: the bundle's
    LoRA adapters for requests that name none (`runtime.load`'s)."""
    from edgeq import runtime

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    path = Path(bundle)
    session = runtime.load(path, backend=backend, threads=threads, n_ctx=n_ctx, device=device, adapters=adapters)
    name = model_name or path.resolve().name
    aliases = tuple(a for a in (session.manifest["model"].get("name"),) if a)
    app = create_app(session, name, aliases=aliases, api_key=api_key, queue_size=queue_size, defaults=defaults)
    sock = _bind(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    log(f"edgeq: serving {name!r} ({session.backend_name} {session.manifest['model'].get('kind')}"
        f"{f', n_ctx {session.n_ctx}' if hasattr(session, 'n_ctx') else ''}) at http://{shown}:{bound[1]}/v1"
        f"{'' if api_key is None else ' (API key required)'}; Ctrl-C stops")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:               # uvicorn shut down gracefully, then passed Ctrl-C on: a normal stop
        log("edgeq: server stopped")
    finally:
        sock.close()
        session.close()


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), IPv4 or IPv6 as the host is written."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise EdgeqError(None, f"cannot serve on host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise EdgeqError(None, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
