"""``orca-compile serve``: the engine behind an OpenAI-compatible HTTP API (FastAPI, uvicorn).

One thread owns the engine (``runtime/engine_loop.py``): between iterations it admits the
requests that arrived, drops the ones whose clients went away, and runs ``step()`` while anything
is unfinished; each output goes to its request's ``asyncio.Queue`` on the server's event loop.
Requests thus join and leave the batch between iterations, as in Orca; the event loop never
waits on a forward.

Endpoints: ``POST /v1/completions`` (``stream`` as server-sent events, ending ``data: [DONE]``),
``GET /v1/models``, ``GET /health`` (503 once the engine has failed), ``GET /metrics`` (Prometheus:
requests running and waiting, KV blocks, iterations, tokens, preemptions, requests finished by
reason and refused; from a snapshot the engine's thread takes after each pass). A request's fields are
OpenAI's, with vLLM's extensions ``top_k``, ``ignore_eos``, ``stop_token_ids`` and ``priority``;
each choice also carries the generated ``token_ids``. Departures from OpenAI, chosen to fail loudly
rather than be ignored: one prompt per request (a string, or token ids), ``n`` = 1, no ``echo``,
no ``stop`` strings (``stop_token_ids`` instead), and ``logprobs`` of 0 or 1 (the sampled token's
log-prob; ``top_logprobs`` is null). Anything the engine refuses (a prompt longer than the model's
context, a token id outside the vocabulary, a bad parameter) is a 400 naming the value and the
limit; that request fails alone and the server goes on.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from orca_compile.runtime.engine_loop import EngineLoop, whole
from orca_compile.runtime.request import SamplingParams


# OpenAI fields this server does not implement, with the value that means "not used": any other
# value is refused (a client relying on them would otherwise get silently different output)
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "stop": None, "suffix": None, "logit_bias": None,
                "presence_penalty": 0, "frequency_penalty": 0}


def _params(body: dict) -> tuple[object, SamplingParams, int, bool, bool]:
    """(prompt, sampling params, priority, stream, logprobs) from a completions request body, or a
    ValueError naming what is not served. A field sent as null takes its default (OpenAI's
    clients send unset fields so); fields this server does not know are ignored, as OpenAI does."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")

    def get(key, default):
        value = body.get(key)
        return default if value is None else value

    def number(key, default):
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return value

    def flag(key):
        value = get(key, False)
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value

    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise ValueError(f"one prompt per request (n prompts: send n requests), got {len(prompt)}")
        prompt = prompt[0]
    if not isinstance(prompt, (str, list)):
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    for key, unused in _UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and value != unused and value not in ("", [], {}):
            hint = " (use stop_token_ids)" if key == "stop" else ""
            raise ValueError(f"{key} is not supported{hint}: it must be {unused!r} or absent, got {value!r}")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or logprobs not in (0, 1)):
        raise ValueError(f"logprobs must be 0 or 1 (the sampled token's log-prob only), got {logprobs!r}")
    top_k = get("top_k", 0)
    if top_k == -1 and not isinstance(top_k, bool):  # vLLM's "off"
        top_k = 0
    params = SamplingParams(max_tokens=get("max_tokens", 16), temperature=number("temperature", 1.0), top_k=top_k,
                            top_p=number("top_p", 1.0), seed=body.get("seed"), stop_token_ids=get("stop_token_ids", ()),
                            ignore_eos=flag("ignore_eos"), logprobs=logprobs is not None)
    return prompt, params, get("priority", 0), flag("stream"), logprobs is not None


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
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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

    def error(status: int, message: str, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.get("/health")
    async def health():
        loop = state["loop"]
        if loop.error is not None:
            return error(503, loop.error, "server_error")
        return {"status": "ok"}

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Metrics(lambda: state["loop"], model_name))

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "orca-compile", "max_model_len": max_model_len or None}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "the request body is not JSON")
        try:
            if isinstance(body, dict) and body.get("model") not in (None, model_name):
                return error(404, f"model {body['model']!r} is not served here; this server serves {model_name!r}",
                             "not_found_error")
            prompt, params, priority, stream, want_logprobs = _params(body)
        except ValueError as exc:
            return error(400, str(exc))
        loop = state["loop"]
        aio = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
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

        def choice(text, token_ids, logprobs, finish_reason):
            return {"index": 0, "text": text, "token_ids": token_ids, "finish_reason": finish_reason,
                    "logprobs": None if not want_logprobs else {"token_logprobs": logprobs, "top_logprobs": None}}

        if stream:
            first = await next_item()  # a refusal is still an HTTP error, before any event is sent
            if first is None:
                return error(499, "the client closed the request")
            if isinstance(first, ValueError):
                return error(400, str(first))
            if isinstance(first, Exception):
                return error(503, str(first), "server_error")

            async def events():
                item, done = first, False
                try:
                    while True:
                        if isinstance(item, Exception):
                            payload = {"error": {"message": str(item), "type": "server_error", "code": 503}}
                            yield f"data: {json.dumps(payload)}\n\n"
                            break
                        chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model_name,
                                 "choices": [choice(item["text"], item["token_ids"], item["logprobs"],
                                                    item["finish_reason"] if item["finished"] else None)]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                        if item["finished"]:
                            done = True
                            break
                        item = await queue.get()
                    yield "data: [DONE]\n\n"
                finally:
                    if not done:  # the client went away (or the engine failed): free its blocks
                        loop.abort(request_id)

            return StreamingResponse(events(), media_type="text/event-stream")

        text, token_ids, logprobs = [], [], []
        while True:
            item = await next_item()
            if item is None:
                return error(499, "the client closed the request")
            if isinstance(item, ValueError):
                return error(400, str(item))
            if isinstance(item, Exception):
                return error(503, str(item), "server_error")
            text.append(item["text"])
            token_ids += item["token_ids"]
            logprobs += item["logprobs"] or []
            if item["finished"]:
                break
        usage = {"prompt_tokens": item["num_prompt_tokens"], "completion_tokens": len(token_ids),
                 "total_tokens": item["num_prompt_tokens"] + len(token_ids)}
        return {"id": request_id, "object": "text_completion", "created": created, "model": model_name,
                "choices": [choice("".join(text), token_ids, logprobs, item["finish_reason"])], "usage": usage}

    return app


def serve(engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_seconds: float = 10.0) -> None:
    """Serve until interrupted (SIGINT, SIGTERM): uvicorn stops taking requests and gives those in
    progress ``graceful_seconds`` to finish; then the engine's thread aborts what is left and ends."""
    import uvicorn

    uvicorn.run(build_app(engine, model_name), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=graceful_seconds)
