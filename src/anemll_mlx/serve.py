"""``serve``: an OpenAI-compatible HTTP API over one driver (FastAPI on uvicorn).

    GET  /v1/models
    POST /v1/chat/completions     messages -> the model's chat template
    POST /v1/completions          a prompt (text or token ids), no template

Both POSTs take ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed`` and ``stream``
(server-sent events ending in ``data: [DONE]``), plus ``top_k`` and ``repetition_penalty`` as
mlx-lm's server does; unknown fields are ignored, known ones of the wrong type are refused.
Unset sampling fields fall back to the export's ``recommended_sampling``, then to greedy.

One model, one decode at a time (an ANE program serves one stream): every request becomes a job
for a single worker thread, so requests queue in arrival order and all model work happens on that
one thread.  The worker keeps a ``generate.Session``: a conversation whose messages extend the
previous request's prefills only what is new.  A client that goes away (a dropped stream, a closed
connection) cancels its job: a queued job never starts, a running one stops at the next token.
Bad requests get a 4xx with OpenAI's error body; an error inside a request is that request's 500,
never the server's end.  SIGINT/SIGTERM stop decoding at the next token and shut down.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import UserError
from .generate import (
    GenerationResult,
    Sampling,
    Session,
    check_prompt,
    generate_ids,
    recommended_sampling,
    room,
)

StrictFloat = Annotated[float, Field(strict=True)]  # ints are still floats; strings are not
MAX_STOPS = 4  # as OpenAI's API


# --- requests ------------------------------------------------------------------------------------


class _Request(BaseModel):
    """Fields both endpoints share; anything else a client sends (user, n=1, penalties...) is ignored."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    repetition_penalty: Annotated[StrictFloat, Field(gt=0)] | None = None
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOPS)] | None = None
    stream: StrictBool = False
    stream_options: dict[str, StrictBool] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1


class _TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[_TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: Annotated[list[_Message], Field(min_length=1)]


class CompletionRequest(_Request):
    prompt: StrictStr | Annotated[list[StrictInt], Field(min_length=1)] | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]


class APIError(Exception):
    """An OpenAI-style error: status, message, and the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# --- the engine: one driver, one worker thread ------------------------------------------------------


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Runs jobs one at a time, in arrival order, on one thread that owns the driver and its session.

    The driver is opened on that thread too: MLX keeps its streams per thread, and an array built
    lazily on one thread cannot be evaluated on another ("There is no Stream(cpu, 0) in current
    thread"), so every piece of model work, loading included, stays on the worker.
    """

    def __init__(self, open_driver: Callable[[], Any]):
        self.closing = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anemll-mlx-decode")
        try:
            self.driver, self._session = self._pool.submit(self._open, open_driver).result()
        except BaseException:
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise
        self.tokenizer = self.driver.tokenizer
        self.recommended = recommended_sampling(self.driver)

    @staticmethod
    def _open(open_driver: Callable[[], Any]) -> tuple[Any, Session]:
        driver = open_driver()
        _ = driver.tokenizer  # an export loads its tokenizer on first use: here, not in a request
        return driver, Session(driver)

    def submit(self, job: Job) -> Future[GenerationResult | None]:
        return self._pool.submit(self._run, job)

    def _run(self, job: Job) -> GenerationResult | None:
        def stopped() -> bool:
            return job.cancel.is_set() or self.closing.is_set()

        if stopped():  # the client left while the job was queued
            return None
        return generate_ids(
            self.driver, job.ids, job.max_tokens, job.sampling, job.on_text,
            stop=job.stop, session=self._session, cancelled=stopped,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the running decode at its next token, drop queued jobs, wait for the worker."""
        self.closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


# --- the app -----------------------------------------------------------------------------------------


def _sampling(engine: Engine, req: _Request) -> Sampling:
    return Sampling.choose(
        engine.recommended, temp=req.temperature, top_p=req.top_p, top_k=req.top_k,
        repetition_penalty=req.repetition_penalty, seed=req.seed,
    )  # fmt: skip


def _job(engine: Engine, req: _Request, ids: list[int]) -> Job:
    """A checked job: the prompt fits the context, max_tokens is clipped to the room left."""
    try:
        check_prompt(engine.driver, ids)
    except UserError as e:
        raise APIError(400, str(e), "messages" if isinstance(req, ChatRequest) else "prompt", "context_length_exceeded") from None
    space = room(engine.driver, len(ids))
    wanted = req.max_completion_tokens or req.max_tokens or space
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return Job(ids, min(wanted, space), _sampling(engine, req), stop)


def _finish(result: GenerationResult | None) -> str:
    return "stop" if result is not None and result.finish_reason == "stop" else "length"


def _usage(job: Job, result: GenerationResult | None) -> dict[str, int]:
    completion = len(result.tokens) if result is not None else 0
    return {"prompt_tokens": len(job.ids), "completion_tokens": completion, "total_tokens": len(job.ids) + completion}


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _type_tag(part: Any) -> bool:
    """Whether a pydantic error location part names a union member (``str``, ``list[str]``,
    ``constrained-int``...) rather than a field or an index."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or any(c in part for c in "[-"))


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI application over ``engine`` (tests may mount it on any ASGI server)."""
    app = FastAPI(title="anemll-mlx", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # a union field fails once per member: the error that is not "wrong type" says more
        errors = sorted(exc.errors(), key=lambda e: str(e.get("type", "")).endswith("_type"))
        first = errors[0] if errors else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body" and not _type_tag(p)]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": ")).response()
        param = ".".join(where) or None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"{type(exc).__name__}: {exc}").response()

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "anemll-mlx"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        tokenizer = engine.tokenizer
        if not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except UserError as e:
            raise APIError(400, str(e), "messages") from None
        job = _job(engine, req, tokenizer.encode(text, add_special_tokens=False))
        ident = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "created": int(time.time()), "model": model_name}
        if not req.stream:
            result = await _wait(engine, job, request)
            message = {"role": "assistant", "content": result.text if result else ""}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(result)}
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": _usage(job, result)})

        def chunk(delta: dict, finish: str | None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        first = chunk({"role": "assistant", "content": ""}, None)
        return _streaming(engine, job, req, first, lambda piece: chunk({"content": piece}, None),
                          lambda finish: chunk({}, finish), {**head, "object": "chat.completion.chunk"})  # fmt: skip

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        tokenizer = engine.tokenizer
        prompt = req.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            ids = [int(t) for t in prompt]
            if any(not 0 <= t < engine.driver.vocab_size for t in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {engine.driver.vocab_size})", "prompt")
        else:
            text = prompt if isinstance(prompt, str) else str(prompt[0])
            ids = tokenizer.encode_prompt(text, chat=False)
        job = _job(engine, req, ids)
        ident = f"cmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "object": "text_completion", "created": int(time.time()), "model": model_name}
        if not req.stream:
            result = await _wait(engine, job, request)
            choice = {"index": 0, "text": result.text if result else "", "logprobs": None, "finish_reason": _finish(result)}
            return JSONResponse({**head, "choices": [choice], "usage": _usage(job, result)})

        def chunk(piece: str, finish: str | None) -> dict:
            return {**head, "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}]}

        return _streaming(engine, job, req, None, lambda piece: chunk(piece, None), lambda finish: chunk("", finish), head)

    return app


async def _wait(engine: Engine, job: Job, request: Request) -> GenerationResult | None:
    """Run a job to its end; a client that disconnects meanwhile cancels it."""
    future = asyncio.wrap_future(engine.submit(job))
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if done:
            return future.result()
        if await request.is_disconnected():
            job.cancel.set()


def _streaming(
    engine: Engine,
    job: Job,
    req: _Request,
    first: dict | None,
    piece_chunk: Callable[[str], dict],
    final_chunk: Callable[[str], dict],
    head: dict,
) -> StreamingResponse:
    """Server-sent events: text pieces as the worker decodes them, the finish reason, optionally the
    usage, then ``[DONE]``.  Leaving the generator early (the client went away) cancels the job."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            job.cancel.set()

    job.on_text = lambda piece: put(("text", piece))
    future = engine.submit(job)
    future.add_done_callback(lambda f: put(("done", f)))
    include_usage = bool((req.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse(first)
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield _sse(piece_chunk(value))
                    continue
                try:
                    result = value.result()
                except Exception as e:  # the request's own failure, reported in the stream
                    status = 400 if isinstance(e, UserError) else 500
                    yield _sse({"error": {"message": str(e), "type": "invalid_request_error" if status == 400 else "server_error", "param": None, "code": None}})
                    yield _sse("[DONE]")
                    return
                yield _sse(final_chunk(_finish(result)))
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(job, result)})
                yield _sse("[DONE]")
                return
        finally:
            job.cancel.set()  # no-op once finished; stops the decode of a client that went away

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --- running it ----------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server, whose signal handling also stops the decode at its next token, so a
    shutdown never waits for a long answer to finish."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine.closing.set()
        super().handle_exit(sig, frame)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one); failures are one UserError line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def run(engine: Engine, sock: socket.socket, model_name: str) -> None:
    """Serve until SIGINT/SIGTERM (which uvicorn re-raises after its graceful shutdown)."""
    config = uvicorn.Config(create_app(engine, model_name), log_level="warning", timeout_graceful_shutdown=5)
    try:
        _Server(config, engine).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
