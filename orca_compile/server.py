"""``orca-compile serve``: the engine behind an OpenAI-compatible HTTP API (FastAPI, uvicorn).

One thread owns the engine (``EngineLoop``): between iterations it admits the requests that
arrived, drops the ones whose clients went away, and runs ``step()`` while anything is unfinished;
each output goes to its request's ``asyncio.Queue`` on the server's event loop. Requests thus
join and leave the batch between iterations, as in Orca; the event loop never waits on a forward.

Endpoints: ``POST /v1/completions`` (``stream`` as server-sent events, ending ``data: [DONE]``),
``GET /v1/models``, ``GET /health`` (503 once the engine has failed). A request's fields are
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
import logging
import threading
import time
import uuid
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from orca_compile.runtime.request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class EngineLoop:
    """The engine, driven by one thread; ``submit`` and ``abort`` may be called from any thread.

    A request's ``sink`` is called on the engine's thread with, in turn, a dict for each step that
    gave it tokens (the last one has ``finished``), or an exception: a ``ValueError`` when the
    engine refused it, a ``RuntimeError`` when the engine failed."""

    def __init__(self, engine):
        self.engine = engine
        self.error: str | None = None  # why the engine stopped serving, once it has
        self._lock = threading.Lock()
        self._incoming: list[tuple] = []
        self._aborts: list[str] = []
        self._sinks: dict[str, Callable] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="orca-engine-loop", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def submit(self, request_id: str, prompt, params: SamplingParams, priority: int, sink: Callable) -> None:
        with self._lock:
            if self._stopping or self.error is not None:
                raise RuntimeError(self.error or "the server is shutting down")
            self._incoming.append((request_id, prompt, params, priority, sink))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left, end the thread (it finishes the iteration it is in)."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        engine = self.engine
        while True:
            self._wake.clear()
            with self._lock:
                incoming, self._incoming = self._incoming, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            for request_id, prompt, params, priority, sink in incoming:
                try:
                    engine.add_request(request_id, prompt, params, priority=priority)
                except ValueError as exc:  # this request alone: a 400
                    sink(exc)
                except Exception as exc:  # noqa: BLE001  (the engine's, not the request's: a 503)
                    sink(RuntimeError(f"{type(exc).__name__}: {exc}"))
                else:
                    self._sinks[request_id] = sink
            if stopping:
                aborts += list(self._sinks)
            for request_id in aborts:
                out = engine.abort_request(request_id)
                sink = self._sinks.pop(request_id, None)
                if sink is not None and out is not None:
                    sink(_delta(out))
            if stopping:
                return
            if not engine.has_unfinished_requests():
                self._wake.wait()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001  (every waiting client hears of it; /health turns 503)
                self.error = f"the engine failed: {type(exc).__name__}: {exc}"
                log.exception("the engine failed; the server answers 503 from now on")
                for sink in self._sinks.values():
                    sink(RuntimeError(self.error))
                self._sinks.clear()
                with self._lock:
                    for *_, sink in self._incoming:
                        sink(RuntimeError(self.error))
                    self._incoming.clear()
                return
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    if out.finished:
                        del self._sinks[out.request_id]
                    sink(_delta(out))


def _delta(out: RequestOutput) -> dict:
    """What a step added to a request, decoded on the engine's thread (a detokenizer is not shared
    across threads)."""
    n = len(out.new_token_ids)
    return {"token_ids": list(out.new_token_ids), "text": out.new_text or "",
            "logprobs": None if out.logprobs is None else out.logprobs[len(out.logprobs) - n:],
            "finished": out.finished, "finish_reason": out.finish_reason,
            "num_prompt_tokens": len(out.prompt_token_ids), "num_tokens": len(out.token_ids)}


def _params(body: dict) -> tuple[object, SamplingParams, int, bool, bool]:
    """(prompt, sampling params, priority, stream, logprobs) from a completions request body, or a
    ValueError naming what is not served."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise ValueError(f"one prompt per request (n prompts: send n requests), got {len(prompt)}")
        prompt = prompt[0]
    if not isinstance(prompt, (str, list)):
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if body.get("n", 1) != 1 or body.get("best_of", 1) not in (1, None):
        raise ValueError(f"n and best_of must be 1, got n={body.get('n')!r} best_of={body.get('best_of')!r}")
    if body.get("echo"):
        raise ValueError("echo is not supported")
    if body.get("stop"):
        raise ValueError(f"stop strings are not supported (use stop_token_ids), got {body['stop']!r}")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or logprobs not in (0, 1)):
        raise ValueError(f"logprobs must be 0 or 1 (the sampled token's log-prob only), got {logprobs!r}")
    top_k = body.get("top_k", 0)
    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k == -1:  # vLLM's "off"
        top_k = 0
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ValueError(f"stream must be true or false, got {stream!r}")
    def get(key, default):  # OpenAI's clients send null for "the default"
        value = body.get(key)
        return default if value is None else value

    params = SamplingParams(max_tokens=get("max_tokens", 16), temperature=get("temperature", 1.0), top_k=top_k,
                            top_p=get("top_p", 1.0), seed=body.get("seed"), stop_token_ids=get("stop_token_ids", ()),
                            ignore_eos=get("ignore_eos", False) is True, logprobs=logprobs is not None)
    return prompt, params, get("priority", 0), stream, logprobs is not None


def build_app(engine, model_name: str):
    """The FastAPI application serving ``engine`` under ``model_name``; its lifespan starts and
    stops the engine's thread (the engine itself is the caller's to shut down)."""
    state = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["loop"] = EngineLoop(engine).start()
        try:
            yield
        finally:
            state["loop"].stop()

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
            loop.submit(request_id, prompt, params, priority, lambda item: aio.call_soon_threadsafe(queue.put_nowait, item))
        except RuntimeError as exc:
            return error(503, str(exc), "server_error")

        def choice(text, token_ids, logprobs, finish_reason):
            return {"index": 0, "text": text, "token_ids": token_ids, "finish_reason": finish_reason,
                    "logprobs": None if not want_logprobs else {"token_logprobs": logprobs, "top_logprobs": None}}

        if stream:
            first = await queue.get()  # a refusal is still an HTTP error, before any event is sent
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

        text, token_ids, logprobs, item = [], [], [], None
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        loop.abort(request_id)
                        return error(499, "the client closed the request")
                    continue
                if isinstance(item, ValueError):
                    return error(400, str(item))
                if isinstance(item, Exception):
                    return error(503, str(item), "server_error")
                text.append(item["text"])
                token_ids += item["token_ids"]
                logprobs += item["logprobs"] or []
                if item["finished"]:
                    break
        except asyncio.CancelledError:
            loop.abort(request_id)
            raise
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
