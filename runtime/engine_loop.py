"""``EngineLoop``: an engine driven by a thread of its own, for fronts that take requests on other
threads (``orca_compile/server.py``'s HTTP server, on an asyncio event loop).

Between iterations the thread admits the requests that were submitted, aborts the ones that were
dropped, and runs ``step()`` while anything is unfinished (it sleeps on an event otherwise). Each
request's outputs go to the ``sink`` it was submitted with, called on the engine's thread: one
dict per step that gave it tokens (``_delta``: the new ids, text and log-probs, decoded there,
since a request's detokenizer is not shared across threads), the last one marked ``finished``;
or an exception. ``snapshot`` (``engine.stats()`` and the loop's own counts) is replaced whole
after each pass, so other threads read it without touching the engine mid-step.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

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
        self._incoming: list[tuple] = []  # submitted, not yet seen by the engine's thread
        self._admitting: list[tuple] = []  # being given to the engine (a failure must reach them too)
        self._aborts: list[str] = []
        self._sinks: dict[str, Callable] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._finished = {"length": 0, "stop": 0, "abort": 0}
        self._refused = 0
        self.snapshot = self._snapshot()  # replaced whole by the engine's thread: safe to read anywhere
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

    def stop(self, timeout: float = 30.0) -> bool:
        """Abort what is left and end the thread (it finishes the iteration it is in); whether it
        ended within ``timeout`` seconds."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the engine's thread is still in an iteration after %.0f s", timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # noqa: BLE001  (every waiting client hears of it; /health turns 503)
            log.exception("the engine failed; the server answers 503 from now on")
            self._fail(f"the engine failed: {type(exc).__name__}: {exc}")

    def _fail(self, error: str) -> None:
        with self._lock:
            self.error = error
            sinks = list(self._sinks.values()) + [item[-1] for item in self._admitting + self._incoming]
            self._sinks.clear()
            self._admitting, self._incoming = [], []
        for sink in sinks:
            try:
                sink(RuntimeError(error))
            except Exception:  # noqa: BLE001  (a client's event loop already gone: nothing to tell)
                pass

    def _serve(self) -> None:
        engine = self.engine
        while True:
            self._wake.clear()
            with self._lock:
                self._admitting, self._incoming = self._incoming, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            while self._admitting:
                request_id, prompt, params, priority, sink = self._admitting[0]
                try:
                    engine.add_request(request_id, prompt, params, priority=priority)
                except ValueError as exc:  # this request alone: a 400
                    self._refused += 1
                    sink(exc)
                else:
                    self._sinks[request_id] = sink
                self._admitting.pop(0)
            if stopping:
                aborts += list(self._sinks)
            for request_id in aborts:
                out = engine.abort_request(request_id)
                sink = self._sinks.pop(request_id, None)
                if out is not None:
                    self._finished["abort"] += 1
                    if sink is not None:
                        sink(_delta(out))
            if stopping:
                return
            if not engine.has_unfinished_requests():
                self.snapshot = self._snapshot()
                self._wake.wait()
                continue
            for out in engine.step():
                if out.finished:
                    self._finished[out.finish_reason] = self._finished.get(out.finish_reason, 0) + 1
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    if out.finished:
                        del self._sinks[out.request_id]
                    sink(_delta(out))
            self.snapshot = self._snapshot()

    def _snapshot(self) -> dict:
        return dict(self.engine.stats(), requests_finished=dict(self._finished), requests_refused=self._refused)


def _delta(out: RequestOutput) -> dict:
    """What a step added to a request, decoded on the engine's thread (a detokenizer is not shared
    across threads)."""
    n = len(out.new_token_ids)
    return {"token_ids": list(out.new_token_ids), "text": out.new_text or "",
            "logprobs": None if out.logprobs is None else out.logprobs[len(out.logprobs) - n:],
            "finished": out.finished, "finish_reason": out.finish_reason,
            "num_prompt_tokens": len(out.prompt_token_ids), "num_tokens": len(out.token_ids)}


def whole(sink: Callable) -> Callable:
    """A sink for a request that is answered whole: the steps' deltas are merged on the engine's
    thread and ``sink`` is called once, at the end (or with an exception). The server's event
    loop then wakes once per such request instead of once per iteration: W1 over HTTP took
    1.18x its in-process time with a wake-up per step (docs/benchmarks.md, "Serving over HTTP")."""
    parts: list[dict] = []

    def merge(item) -> None:
        if isinstance(item, BaseException):
            sink(item)
            return
        parts.append(item)
        if item["finished"]:
            logprobs = [lp for p in parts for lp in p["logprobs"]] if item["logprobs"] is not None else None
            sink(dict(item, token_ids=[t for p in parts for t in p["token_ids"]],
                      text="".join(p["text"] for p in parts), logprobs=logprobs))

    return merge
