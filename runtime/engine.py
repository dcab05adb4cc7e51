"""The engine: requests in, one iteration per ``step()``, outputs out.

``step()`` is three moves: the scheduler decides (``SchedulerOutput``), the executor runs the
rewritten graph and samples (``RunnerOutput``), the scheduler applies the result. Requests join
and leave between any two steps. Bad input is refused in ``add_request`` with a ``ValueError``
before the request touches any state, so it fails alone and the engine goes on serving.

The engine talks to the scheduler and to the executor through their interfaces only: it builds
the executor named by ``EngineConfig.executor`` from a model source (``executor.py``), reads what
it needs of the model from ``executor.info``, and ``shutdown()`` (or leaving its ``with`` block)
releases the executor and everything it started.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import operator
import time
from typing import Callable, Iterator, Sequence

import torch

from orca_compile.runtime.config import EngineConfig
from orca_compile.runtime.detokenizer import Detokenizer
from orca_compile.runtime.executor import Executor, ModelInfo, make_executor
from orca_compile.runtime.kv_cache import default_num_kv_blocks
from orca_compile.runtime.request import Request, RequestOutput, SamplingParams
from orca_compile.runtime.scheduler import Scheduler


@dataclasses.dataclass
class IterationStats:
    """What one ``step()`` did and where its time went."""

    iteration: int
    request_ids: list[str]  # in the batch, in batch order
    num_scheduled_tokens: list[int]  # tokens each of them fed (1 for a decode)
    num_prefill_tokens: int
    num_decode_tokens: int
    num_running: int  # admitted requests after the step (some may have sat this one out)
    num_waiting: int
    num_preempted: int
    kv_blocks_used: int
    schedule_seconds: float
    prepare_seconds: float
    forward_seconds: float
    sample_seconds: float
    update_seconds: float
    collective_seconds: float = 0.0  # of forward_seconds, in a tensor-parallel graph's all-reduces (rank 0)

    @property
    def seconds(self) -> float:
        return (self.schedule_seconds + self.prepare_seconds + self.forward_seconds + self.sample_seconds
                + self.update_seconds)

    @property
    def overhead_seconds(self) -> float:
        """CPU time outside the graph: scheduling, batch building, sampling, bookkeeping."""
        return self.seconds - self.forward_seconds


class Engine:
    def __init__(self, model, config: EngineConfig, tokenizer=None, seed: int = 0):
        """``model``: a model source, built by the executor (``orca_compile.compiler.ModelSpec``;
        ``optimize()`` makes one). ``config.max_model_len`` None takes the model's limit and
        ``config.num_kv_blocks`` None sizes the cache from memory (``kv_cache.default_num_kv_blocks``)."""
        self.tokenizer = tokenizer
        self.plan = None  # the partition plan optimize(plan=...) chose, with its predicted cost
        self.executor: Executor = make_executor(config.executor, model, seed=seed)
        try:
            self.config = config = _fit(config, self.executor.info)
            if config.preemption_mode == "swap":  # only then: an executor of the older signature still works
                self.executor.init_kv_cache(config.num_kv_blocks, config.block_size,
                                            num_host_blocks=config.num_host_kv_blocks)
            else:
                self.executor.init_kv_cache(config.num_kv_blocks, config.block_size)
            self.scheduler = Scheduler(config)
        except BaseException:
            self.executor.shutdown()
            raise
        self._closed = False
        # iterations started and not yet completed, oldest first (a pipeline holds one per stage)
        self._in_flight: collections.deque = collections.deque()
        self._failure: str | None = None  # an iteration failed: the engine refuses further steps
        self.max_in_flight = config.max_in_flight or self.executor.max_in_flight
        self.scheduler.pipeline_depth = self.max_in_flight
        self.num_iterations = 0
        self.num_generated_tokens = 0
        self.num_computed_tokens = 0  # every token fed through the graph, recomputes included
        self.iteration_stats: collections.deque[IterationStats] = collections.deque(maxlen=100_000)
        self._arrivals = itertools.count()
        self._auto_ids = itertools.count()
        self._detokenizers: dict[str, Detokenizer] = {}  # unfinished requests' (with a tokenizer)
        self._streams: dict[str, collections.deque] = {}  # open streams' outputs, not yet yielded
        self._special_ids: frozenset[int] | None = None  # the tokenizer's, which decode skips

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Queue a request; it joins the batch at the next iteration with room for it. ``priority``:
        the ``priority`` policy's order (lower first); other policies ignore it."""
        self._check_open()
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer (lower runs first), got {priority!r}")
        if request_id in self.scheduler:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        prompt_ids = self._prompt_ids(prompt)
        self._check_fits(prompt_ids, params)
        req = Request(request_id, prompt_ids, params, next(self._arrivals), self.info.eos_token_ids, priority)
        self.scheduler.add(req)
        if self.tokenizer is not None:
            if self._special_ids is None:
                self._special_ids = frozenset(getattr(self.tokenizer, "all_special_ids", ()))
            self._detokenizers[request_id] = Detokenizer(self.tokenizer, req, self._special_ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request wherever it is and free its blocks; returns its final output (or None
        if the engine does not know it)."""
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        out = RequestOutput.of(req, [], self._detokenizers.pop(request_id, None))
        if request_id in self._streams:  # a stream of it ends with this
            self._streams[request_id].append(out)
        return out

    def has_unfinished_requests(self) -> bool:
        """Requests to serve, or iterations still in flight (an aborted request's may be)."""
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    # ---- one iteration -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run exactly one iteration. Returns an output for each request that got a token (a
        request that only advanced its prompt by a chunk has nothing to report).

        With pipeline stages (``max_in_flight`` > 1), a step first fills the pipeline (schedules
        and starts iterations, each over requests not already in flight, until ``max_in_flight``
        are running or nothing more can run) and then completes the oldest: each step still
        finishes one iteration, and the stages work on different iterations meanwhile (Orca's
        pipelining, no micro-batches)."""
        self._check_open()
        if self._failure is not None:  # iterations were lost with it: their requests would wait forever
            raise RuntimeError(f"the workers failed earlier ({self._failure}); shut the engine down")
        try:
            outputs = self._step()
        except BaseException as exc:  # an iteration's result is lost: its requests are stuck in flight
            self._failure = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RuntimeError) else str(exc)
            raise
        if self._streams:  # every open stream gets its request's outputs, whoever stepped
            for out in outputs:
                if out.request_id in self._streams:
                    self._streams[out.request_id].append(out)
        return outputs

    def _step(self) -> list[RequestOutput]:
        while len(self._in_flight) < self.max_in_flight:
            t0 = time.perf_counter()
            decision = self.scheduler.schedule()
            t1 = time.perf_counter()
            if decision.is_empty:
                if decision.finished_request_ids:  # nothing to run, but the runner must drop their state,
                    if self._in_flight:  # after the iterations in flight (which may still sample for them)
                        self.scheduler.defer_finished(decision.finished_request_ids)
                    else:
                        self.executor.release(decision.finished_request_ids)
                break
            self.executor.submit(decision)
            self._in_flight.append((decision, t0, t1))
        if not self._in_flight:
            return []
        decision, t0, t1 = self._in_flight.popleft()  # t1: when it was submitted
        result = self.executor.collect()
        t2 = time.perf_counter()
        touched = self.scheduler.update(decision, result.sampled_token_ids, result.logprobs)
        detoks = self._detokenizers
        outputs = [RequestOutput.of(req, new, detoks.pop(req.request_id, None) if req.status.finished
                                    else detoks.get(req.request_id)) for req, new in touched]
        t3 = time.perf_counter()
        self.num_iterations += 1
        self.num_generated_tokens += len(result.sampled_token_ids)
        self.num_computed_tokens += decision.num_tokens
        self.iteration_stats.append(IterationStats(
            self.num_iterations, decision.request_ids, [len(t) for t in decision.new_token_ids],
            decision.num_prefill_tokens, decision.num_decode_tokens,
            self.scheduler.num_running, self.scheduler.num_waiting, len(decision.preempted_request_ids),
            self.scheduler.num_kv_blocks_used, t1 - t0, result.prepare_seconds, result.forward_seconds,
            result.sample_seconds, (t2 - t1 - result.prepare_seconds - result.forward_seconds - result.sample_seconds)
            + (t3 - t2), result.collective_seconds))
        return outputs

    @property
    def last_iteration(self) -> IterationStats | None:
        return self.iteration_stats[-1] if self.iteration_stats else None

    # ---- blocking convenience ------------------------------------------------------------------

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_step: Callable[[IterationStats, list[RequestOutput]], None] | None = None,
                 priority: int | Sequence[int] = 0) -> list[RequestOutput]:
        """Serve ``prompts`` to completion; returns their final outputs in prompt order.
        ``priority``: one for all prompts or one each (the ``priority`` policy's; lower first).

        Requests already in the engine keep being served alongside (their outputs go to nobody:
        drive ``step()`` yourself to see them). If one prompt is refused, none of this call's
        requests stays queued and the ``ValueError`` names the prompt's index.
        """
        if isinstance(prompts, str) or getattr(prompts, "ndim", 2) == 1 or (
                len(prompts) > 0 and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of prompts (strings or token-id lists), not a single prompt")
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        priorities = [priority] * len(prompts) if isinstance(priority, int) else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"{len(priorities)} priorities for {len(prompts)} prompts")
        ids = []
        for i, (prompt, p, prio) in enumerate(zip(prompts, params, priorities)):
            rid = f"generate-{next(self._auto_ids)}"
            while rid in self.scheduler:  # a caller's own request may hold the name
                rid = f"generate-{next(self._auto_ids)}"
            try:
                self.add_request(rid, prompt, p, priority=prio)
            except Exception as exc:
                for added in ids:
                    self.abort_request(added)
                if isinstance(exc, ValueError):
                    raise ValueError(f"prompt {i}: {exc}") from None
                raise
            ids.append(rid)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            assert self.has_unfinished_requests(), "requests vanished without a final output"
            outputs = self.step()
            for out in outputs:
                if out.finished:
                    final[out.request_id] = out
            if on_step is not None and self.last_iteration is not None:
                on_step(self.last_iteration, outputs)
        return [final[rid] for rid in ids]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               priority: int = 0) -> Iterator[RequestOutput]:
        """Serve one prompt and yield its output at each iteration that gives it tokens:
        ``new_token_ids`` (and ``new_text`` with a tokenizer) are that step's, the last one has
        ``finished`` set (``finish_reason`` "abort" if it was aborted meanwhile). Requests already
        in the engine are served alongside; several streams may be read together, and steps taken
        by anyone else feed them too (each stream buffers its request's outputs). Leaving the loop
        early (``break``, an exception, closing the generator) aborts the request."""
        rid = f"stream-{next(self._auto_ids)}"
        while rid in self.scheduler:
            rid = f"stream-{next(self._auto_ids)}"
        self.add_request(rid, prompt, params, priority=priority)
        buffer = self._streams[rid] = collections.deque()
        done = False
        try:
            while not done:
                if not buffer:
                    self.step()
                    continue
                out = buffer.popleft()
                done = out.finished
                yield out
        finally:
            self._streams.pop(rid, None)
            if not done and not self._closed:
                self.abort_request(rid)

    @property
    def block_manager(self):
        """The scheduler's KV block manager, for inspection (``check()``, ``block_table(id)``)."""
        return self.scheduler.block_manager

    @property
    def info(self) -> ModelInfo:
        """What the engine knows of the model (vocabulary, EOS ids, context limit, cache bytes)."""
        return self.executor.info

    @property
    def backend(self) -> str:
        """The backend the graph runs on (``auto`` resolved): eager, cpu, onednn or inductor."""
        return self.info.backend

    # ---- lifetime ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Release the executor (the model, the KV cache, any process it started) and drop every
        request. Idempotent; the engine refuses work afterwards."""
        if self._closed:
            return
        self._closed = True
        self.executor.shutdown()
        self.scheduler.abort_all()
        self._detokenizers.clear()

    @property
    def is_shut_down(self) -> bool:
        return self._closed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is shut down")

    def stats(self) -> dict:
        return {
            "num_waiting": self.scheduler.num_waiting,
            "num_running": self.scheduler.num_running,
            "kv_blocks_used": self.scheduler.num_kv_blocks_used,
            "kv_blocks_total": self.config.num_kv_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_recomputes": self.scheduler.num_recomputes,
            "num_swaps_out": self.scheduler.num_swaps_out,
            "num_swaps_in": self.scheduler.num_swaps_in,
            "host_kv_blocks_used": (self.scheduler.host_block_manager.num_used_blocks
                                    if self.scheduler.host_block_manager is not None else 0),
            "num_iterations": self.num_iterations,
            "num_generated_tokens": self.num_generated_tokens,
            "num_computed_tokens": self.num_computed_tokens,
        }

    # ---- validation ----------------------------------------------------------------------------

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass tokenizer= to optimize(), or give token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point:
                raise ValueError(f"a tensor prompt must be 1-D integer token ids, got {prompt.dtype} {tuple(prompt.shape)}")
            ids = prompt.tolist()
        else:
            try:
                ids = list(prompt)
            except TypeError:
                raise ValueError(f"a prompt is a string or a sequence of token ids, got {type(prompt).__name__}") from None
        if not ids:
            raise ValueError("the prompt is empty: at least 1 token is needed")
        vocab = self.info.vocab_size
        out = []
        for t in ids:
            try:
                if isinstance(t, bool):
                    raise TypeError
                t = operator.index(t)  # int, numpy integers; not floats or strings
            except TypeError:
                raise ValueError(f"token ids must be integers, got {t!r} ({type(t).__name__})") from None
            if not 0 <= t < vocab:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {vocab})")
            out.append(t)
        return out

    def _check_fits(self, ids: list[int], params: SamplingParams) -> None:
        cfg = self.config
        total = len(ids) + params.max_tokens
        if cfg.max_model_len and total > cfg.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                             f"model's context of {cfg.max_model_len} tokens")
        kv_tokens = total - 1  # the last sampled token is never fed
        blocks = self.scheduler.kv_blocks_for(kv_tokens)
        if blocks > cfg.num_kv_blocks:
            raise ValueError(f"prompt + max_tokens needs {blocks} KV blocks of {cfg.block_size} tokens; the cache "
                             f"has {cfg.num_kv_blocks} in all, so this request could never fit")
        if not cfg.chunked_prefill:
            # without chunking, a prompt (or, after a preemption, prompt + output) runs in one go
            # (a reserving engine never preempts, unless its policy displaces residents)
            longest = len(ids) if cfg.kv_mode == "reserve" and not self.scheduler.policy.displaces else kv_tokens
            if longest > cfg.max_num_batched_tokens:
                raise ValueError(f"{longest} tokens would have to run in one iteration, over "
                                 f"max_num_batched_tokens={cfg.max_num_batched_tokens} (chunked_prefill is off)")


def _fit(config: EngineConfig, info: ModelInfo) -> EngineConfig:
    """``config`` with ``max_model_len`` and ``num_kv_blocks`` settled against the model: the
    model's own context limit where none is given (a larger one is a ``ValueError``), and a cache
    sized from memory where no block count is given."""
    limit = info.max_model_len
    max_model_len = config.max_model_len
    if max_model_len is None:
        max_model_len = limit
    elif max_model_len == 0 and limit:
        raise ValueError(f"max_model_len=0 (no limit) for a model whose context is {limit} tokens")
    elif limit and max_model_len > limit:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's context of {limit} tokens")
    num_kv_blocks = config.num_kv_blocks
    if num_kv_blocks is None:
        num_kv_blocks = default_num_kv_blocks(info, config.max_num_seqs, config.block_size, max_model_len)
    num_host = config.num_host_kv_blocks
    if config.preemption_mode == "swap" and num_host is None:
        num_host = num_kv_blocks  # a pool the size of the device cache (vLLM sizes its swap space in GiB)
    return dataclasses.replace(config, max_model_len=max_model_len, num_kv_blocks=num_kv_blocks,
                               num_host_kv_blocks=num_host)
