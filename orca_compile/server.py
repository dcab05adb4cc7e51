"""``orca-compile serve``: the engine behind an OpenAI-compatible HTTP API (FastAPI, uvicorn).

One thread owns the engine (``runtime/engine_loop.py``): between iterations it admits the
requests that arrived, drops the ones whose clients went away, and runs ``step()`` while anything
is unfinished; each output goes to its request's ``asyncio.Queue`` on the server's event loop.
Requests thus join and leave the batch between iterations, as in Orca; the event loop never
waits on a forward.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (the messages through the
tokenizer's chat template; both stream as server-sent events ending ``data: [DONE]``; fields and
refusals: ``orca_compile/openai_protocol.py``), ``GET /v1/models``, ``GET /health`` (503 once the
engine has failed), ``GET /metrics`` (Prometheus: requests running and waiting, KV blocks,
iterations, tokens, preemptions, requests finished by reason and refused; from a snapshot the
engine's thread takes after each pass). Anything the engine refuses (a prompt longer than the
model's context, a token id outside the vocabulary, a bad parameter) is a 400 naming the value
and the limit; that request fails alone and the server goes on.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
import uuid
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from orca_compile.openai_protocol import ChatShape, CompletionShape, chat_request, completion_request
from orca_compile.runtime.engine_loop import EngineLoop, whole


class _Metrics:
    """A Prometheus collector over the loop's latest snapshot (a registry per app: no globals)."""

    GAUGES = {"num_waiting": ("orca_num_requests_waiting", "requests queued, not running"),
              "num_running": ("orca_num_requests_running", "requests in the running batch"),
              "kv_blocks_used": ("orca_kv_blocks_used", "KV cache blocks in use"),
              "kv_blocks_total": ("orca_kv_blocks_total", "KV cache blocks in all")}
    COUNTERS = {"num_iterations": ("orca_iterations", "iterations run"),
                "num_generated_tokens": ("orca_generation_tokens", "tokens generated"),
                "num_computed_tokens": ("orca_computed_tokens", "tokens run through the model (prompts included)"),
                "num_preemptions": ("orca_preemptions", "requests preempted"),
                "requests_refused": ("orca_requests_refused", "requests the engine refused (400)")}

    def __init__(self, loop_of: Callable[[], EngineLoop], model_name: str):
        self.loop_of, self.model_name = loop_of, model_name

    def collect(self):
        snap = self.loop_of().snapshot
        for key, (name, doc) in self.GAUGES.items():
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], snap[key])
            yield g
        for key, (name, doc) in self.COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self.model_name], snap[key])
            yield c
        c = CounterMetricFamily("orca_requests_finished", "requests finished, by reason",
                                labels=["model_name", "reason"])
        for reason, n in snap["requests_finished"].items():
            c.add_metric([self.model_name, reason], n)
        yield c


def build_app(engine, model_name: str):
    """The FastAPI application serving ``engine`` under ``model_name``. Its lifespan starts the
    engine's thread, and at the end stops it and shuts the engine down (uvicorn re-raises SIGTERM
    once it has stopped, so nothing after it in the process would run)."""
    state = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["loop"] = EngineLoop(engine).start()
        try:
            yield
        finally:
            if await asyncio.to_thread(state["loop"].stop):
                engine.shutdown()  # its worker processes, if any, go now

    app = FastAPI(title="orca-compile", lifespan=lifespan)
    max_model_len = engine.info.max_model_len
    # the handlers' own tokenizer (chat templates, token strings): the engine's thread decodes with
    # the engine's, and a Rust tokenizer used from two threads at once can refuse ("Already borrowed")
    tokenizer = copy.deepcopy(engine.tokenizer)

    def error(status: int, message: str, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.get("/health")
    async def health():
        loop = state["loop"]
        if loop.error is not None:
            return error(503, loop.error, "server_error")
        return {"status": "ok"}

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Metrics(lambda: state["loop"], model_name))

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "orca-compile", "max_model_len": max_model_len or None}]}

    async def read(request: Request, parse):
        """(the parsed request, None), or (None, an error response)."""
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, error(400, "the request body is not JSON")
        if isinstance(body, dict) and body.get("model") not in (None, model_name):
            return None, error(404, f"model {body['model']!r} is not served here; this server serves "
                                    f"{model_name!r}", "not_found_error")
        try:
            return parse(body), None
        except ValueError as exc:
            return None, error(400, str(exc))

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed, failed = await read(request, completion_request)
        return failed or await respond(request, *parsed, CompletionShape, "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed, failed = await read(request, lambda body: chat_request(body, tokenizer, max_model_len))
        return failed or await respond(request, *parsed, ChatShape, "chatcmpl")

    async def respond(request, prompt, params, priority, stream, want_logprobs, shape_cls, prefix):
        loop = state["loop"]
        aio = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        shape = shape_cls(request_id, int(time.time()), model_name, want_logprobs, tokenizer)
        try:
            sink = lambda item: aio.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
            loop.submit(request_id, prompt, params, priority, sink if stream else whole(sink))
        except RuntimeError as exc:
            return error(503, str(exc), "server_error")

        async def next_item():
            """The request's next output or exception; None once the client has gone (aborted)."""
            try:
                while True:
                    try:
                        return await asyncio.wait_for(queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            loop.abort(request_id)
                            return None
            except asyncio.CancelledError:
                loop.abort(request_id)
                raise

        # the first item: a refusal is still an HTTP error, before any event of a stream is sent
        item = await next_item()
        if item is None:
            return error(499, "the client closed the request")
        if isinstance(item, ValueError):
            return error(400, str(item))
        if isinstance(item, Exception):
            return error(503, str(item), "server_error")
        if not stream:  # answered whole: one item
            n = len(item["token_ids"])
            usage = {"prompt_tokens": item["num_prompt_tokens"], "completion_tokens": n,
                     "total_tokens": item["num_prompt_tokens"] + n}
            return shape.response(item, usage)

        async def events():
            nonlocal item
            first, done = True, False
            try:
                while True:
                    if isinstance(item, Exception):
                        payload = {"error": {"message": str(item), "type": "server_error", "code": 503}}
                        yield f"data: {json.dumps(payload)}\n\n"
                        break
                    yield f"data: {json.dumps(shape.chunk(item, first))}\n\n"
                    first = False
                    if item["finished"]:
                        done = True
                        break
                    item = await queue.get()
                yield "data: [DONE]\n\n"
            finally:
                if not done:  # the client went away (or the engine failed): free its blocks
                    loop.abort(request_id)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_seconds: float = 10.0) -> None:
    """Serve until interrupted (SIGINT, SIGTERM): uvicorn stops taking requests and gives those in
    progress ``graceful_seconds`` to finish; then the engine's thread aborts what is left and ends."""
    import uvicorn

    uvicorn.run(build_app(engine, model_name), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=graceful_seconds)
