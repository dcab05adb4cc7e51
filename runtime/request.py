"""A request's life in the engine: what the user asked for (``SamplingParams``), the state the
scheduler keeps (``Request``), and what the user gets back (``RequestOutput``)."""
from __future__ import annotations

import dataclasses
import enum
import math


GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as in vLLM)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature=0`` (or anything below 1e-5) is greedy. ``top_k=0`` and ``top_p=1.0`` switch those filters off. ``seed``
    gives the request its own random stream: the same seed yields the same tokens whatever else
    shares the batch. ``logprobs=True`` returns the log-probability of each chosen token under
    the model's own distribution (before temperature, top-k and top-p).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0 \
                or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):  # NaN fails this too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}")
        try:
            stops = tuple(self.stop_token_ids)
        except TypeError:
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}") from None
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stops):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", stops)

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflows float32 and the draw is argmax anyway
        return self.temperature < GREEDY_BELOW


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted and back in the queue
    RUNNING = "running"  # admitted: holds KV blocks and is scheduled while budget lasts
    FINISHED_LENGTH = "length"
    FINISHED_STOP = "stop"
    FINISHED_ABORT = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOP, RequestStatus.FINISHED_ABORT)


class Request:
    """Scheduler-side state of one request.

    ``token_ids`` is the prompt followed by every generated token; the first
    ``num_computed_tokens`` of them have their K/V in the cache. Whatever lies beyond is fed in the
    coming iterations: the prompt (in chunks), one token per decode step, or everything again
    after a preemption by recompute.
    """

    __slots__ = ("request_id", "prompt_token_ids", "params", "arrival", "token_ids", "logprobs",
                 "num_computed_tokens", "status", "num_preemptions", "stop_ids", "priority")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: int,
                 eos_token_ids: tuple[int, ...] = (), priority: int = 0):
        self.request_id = request_id
        self.priority = priority  # the priority policy's: lower first
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival = arrival  # FCFS order: a counter, not a clock, so ties cannot happen
        self.token_ids = list(prompt_token_ids)
        self.logprobs: list[float] = []
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_token_ids))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose K/V is not in the cache yet: what the next iterations must feed."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def max_kv_tokens(self) -> int:
        """Most K/V slots this request can ever hold: its last sampled token is never fed."""
        return self.num_prompt_tokens + self.params.max_tokens - 1

    def append_token(self, token_id: int, logprob: float | None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if token_id in self.stop_ids:
            self.status = RequestStatus.FINISHED_STOP
        elif self.num_output_tokens >= self.params.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH

    def __repr__(self):
        return (f"Request({self.request_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens})")


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token so far
    new_token_ids: list[int]  # generated in this step
    logprobs: list[float] | None  # log-prob of each generated token, when asked
    finished: bool
    finish_reason: str | None  # "length", "stop", "abort"; None while running
    num_preemptions: int = 0
    detokenizer: object = dataclasses.field(default=None, repr=False, compare=False)  # the request's, or None

    @property
    def text(self) -> str | None:
        """The generated tokens decoded (special tokens skipped), when a tokenizer is known.
        Decoded when read, incrementally (``runtime/detokenizer.py``): a stream that never reads
        it pays nothing, one that reads it every step pays for the new tokens only."""
        if self.detokenizer is None:
            return None
        return self.detokenizer.text_until(len(self.token_ids), self.finished)

    @property
    def new_text(self) -> str | None:
        """The text this step added: ``text`` grows by exactly this much from the previous step's
        output. Empty while the step's tokens end inside a character (its other bytes are still
        to come) or are special tokens."""
        if self.detokenizer is None:
            return None
        n = len(self.token_ids)
        return self.detokenizer.text_between(n - len(self.new_token_ids), n, self.finished)

    @classmethod
    def of(cls, req: Request, new_token_ids: list[int], detokenizer=None) -> "RequestOutput":
        if detokenizer is not None:
            detokenizer.mark(req.num_output_tokens)
        return cls(req.request_id, req.prompt_token_ids, req.output_token_ids, new_token_ids,
                   list(req.logprobs) if req.params.logprobs else None, req.status.finished,
                   req.status.value if req.status.finished else None, req.num_preemptions, detokenizer)
