"""``executor="multiproc"``: one worker process per rank (tensor-parallel rank x pipeline stage), on
this machine. Rank ``stage * tp + r`` is rank ``r`` of stage ``stage``; the ranks of a stage
all-reduce within their own group, and rank ``r`` of a stage sends its residual stream to rank
``r`` of the next.

Each worker receives the model *source* for its rank (``source.for_rank(rank)``: where to load
the model from, the backend, the tensor-parallel size and its rank), joins a ``torch.distributed``
process group (gloo on the CPU, NCCL on CUDA; rendezvous on 127.0.0.1), builds its own shard and
its own KV cache, and then runs each iteration the engine sends it. Control and tensors travel
apart, as in Orca: the scheduler's decision (a ``SchedulerOutput``, a few hundred bytes) goes to
every worker over a pipe; activations meet only inside the graphs, in ``orca::all_reduce``. Every
rank computes the full logits (the LM head is replicated) and samples the same tokens from the
same seeds; rank 0's result goes back to the engine.

Failure is bounded: waiting on a worker, the executor checks every ``POLL_SECONDS`` that every
worker is alive and whether any has reported an error, so a dead or failed worker is an error
within a fraction of a second (the failed rank's own message, not a peer's "connection
closed"); a collective that hangs (a peer that stopped answering) fails in the workers after
``collective_timeout`` seconds (gloo's own timeout), and they report it. An iteration itself has
no deadline: a long prefill is not a hang. Either way the engine raises naming the rank, and the
executor refuses further work; ``shutdown()`` then stops every worker (asks, waits
``JOIN_SECONDS``, kills), and leaves no process behind.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import time

import torch

from orca_compile.runtime.executor import Executor, ModelInfo, join_process_group, register_executor
from orca_compile.runtime.model_runner import RunnerOutput
from orca_compile.runtime.scheduler import SchedulerOutput

POLL_SECONDS = 0.05
GRACE_SECONDS = 10.0
JOIN_SECONDS = 10.0
DEFAULT_COLLECTIVE_TIMEOUT = 30.0  # seconds a collective may wait for a peer before it fails
START_TIMEOUT = 300.0  # building a shard compiles a model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(source, rank, world_size, port, seed, threads, collective_timeout, conn):
    import torch.distributed as dist

    from orca_compile.runtime.host import tune_malloc
    from orca_compile.runtime.model_runner import ModelRunner

    try:
        if threads:
            torch.set_num_threads(threads)
        backend = "nccl" if source.device_type == "cuda" else "gloo"
        if source.device_type == "cpu":
            tune_malloc()
        else:  # one GPU per rank
            torch.cuda.set_device(rank % torch.cuda.device_count())
        join_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                           timeout=datetime.timedelta(seconds=collective_timeout))
        tp = int(getattr(source, "tensor_parallel_size", 1))
        if 1 < tp < world_size:  # tensor parallelism within pipeline stages: a group per stage
            from orca_compile.ops import set_tensor_parallel_group

            groups = [dist.new_group(list(range(s * tp, (s + 1) * tp)),
                                     timeout=datetime.timedelta(seconds=collective_timeout))
                      for s in range(world_size // tp)]
            set_tensor_parallel_group(groups[rank // tp])
        model = source.build()
        runner = ModelRunner(model, seed=seed)
        conn.send(("ready", ModelInfo.of(model)))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            kind = msg[0]
            if kind == "execute":
                result = runner.execute(msg[1])
                m = runner.model  # the last stage's first rank answers (every rank there samples alike)
                answers = m.stage == m.num_stages - 1 and m.tensor_parallel_rank == 0
                conn.send(("ok", result if answers else None))
            elif kind == "release":
                runner.sampler.forget(msg[1])
            elif kind == "init_kv_cache":
                runner.init_kv_cache(*msg[1:])
                conn.send(("ok", None))
            else:
                raise RuntimeError(f"unknown message {kind!r}")
    except (EOFError, KeyboardInterrupt):
        pass  # the engine went away
    except BaseException as exc:  # noqa: BLE001  (reported to the engine, which raises)
        try:
            conn.send(("error", (type(exc).__name__, str(exc))))
        except (BrokenPipeError, OSError):
            pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class MultiprocExecutor(Executor):
    """``source.tensor_parallel_size`` workers, one per rank; see the module docstring."""

    def __init__(self, source, seed: int = 0, collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT):
        world_size = int(getattr(source, "world_size", getattr(source, "tensor_parallel_size", 1)))
        self.pipelined = int(getattr(source, "pipeline_parallel_size", 1)) > 1
        if not callable(getattr(source, "for_rank", None)):
            raise ValueError(f"the multiproc executor needs a source with for_rank() (orca_compile.ModelSpec), "
                             f"got {type(source).__name__}")
        self.world_size = world_size
        self.collective_timeout = collective_timeout
        self._broken = ""
        self._early = []
        threads = max(1, (os.cpu_count() or 1) // world_size) if source.device_type == "cpu" else 0
        ctx = multiprocessing.get_context("spawn")
        port = _free_port()
        self.processes, self.conns = [], []
        self._early: list[list] = [[] for _ in range(world_size)]  # answers read ahead, per rank
        try:
            for rank in range(world_size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(source.for_rank(rank), rank, world_size, port, seed, threads,
                                                         collective_timeout, child), daemon=True,
                                   name=f"orca-rank-{rank}")
                proc.start()
                child.close()
                self.processes.append(proc)
                self.conns.append(parent)
            infos = [self._recv(rank, START_TIMEOUT) for rank in range(world_size)]
        except BaseException:
            self.shutdown()
            raise
        self.info: ModelInfo = ModelInfo.of_pipeline(infos) if self.pipelined else infos[0]
        tp = int(getattr(source, "tensor_parallel_size", 1))
        self._answer = world_size - tp if self.pipelined else 0  # the rank whose sampled tokens count
        # a pipeline holds an iteration per stage: stage 0 starts the next while stage 1 runs this one
        self.max_in_flight = int(getattr(source, "pipeline_parallel_size", 1))
        self._in_flight = 0

    def init_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        self._round(("init_kv_cache", num_blocks, block_size, num_host_blocks))

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.submit(out)
        return self.collect()

    def submit(self, out: SchedulerOutput) -> None:
        """Send one iteration to every rank. Each rank runs the iterations in the order they come
        (its pipe is a queue), and p2p sends between stages keep that order too."""
        self._checked(self._send_all, ("execute", out))
        self._in_flight += 1

    def collect(self) -> RunnerOutput:
        """Every rank's answer to the oldest iteration in flight (each answers in order)."""
        if not self._in_flight:
            raise RuntimeError("collect() with no iteration in flight")
        answers = self._checked(lambda: [self._recv(rank, None) for rank in range(self.world_size)])
        self._in_flight -= 1
        return answers[self._answer]

    def _checked(self, fn, *args):
        if self._broken:
            raise RuntimeError(f"the workers failed earlier ({self._broken}); shut the engine down")
        try:
            return fn(*args)
        except (RuntimeError, ValueError) as exc:
            self._broken = str(exc)
            raise

    def _round(self, msg) -> list:
        """Send ``msg`` to every rank and collect every answer. No deadline while every worker is
        alive: an iteration may take long, and a collective that hangs fails inside the workers
        (gloo's timeout), which answer with the error. After a failure the executor refuses work:
        the ranks' pipes may hold answers of the failed round."""
        if self._broken:
            raise RuntimeError(f"the workers failed earlier ({self._broken}); shut the engine down")
        try:
            self._send_all(msg)
            return [self._recv(rank, None) for rank in range(self.world_size)]
        except (RuntimeError, ValueError) as exc:
            self._broken = str(exc)
            raise

    def release(self, request_ids: list[str]) -> None:
        if not self._broken:
            self._send_all(("release", list(request_ids)))

    def shutdown(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        # after a failure a rank may be stuck (in a collective, or stopped): do not wait long for it
        deadline = time.monotonic() + (1.0 if self._broken else JOIN_SECONDS)
        for proc in self.processes:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=JOIN_SECONDS)
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []

    # ---- messages -------------------------------------------------------------------------------

    def _send_all(self, msg) -> None:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(msg)
            except (BrokenPipeError, OSError):
                raise RuntimeError(self._dead(rank)) from None

    def _recv(self, rank: int, timeout: float | None):
        """Rank ``rank``'s answer; an error as soon as any rank reports one or is found dead (the
        first rank's own error first: a peer's "connection closed" is its consequence), or after
        ``timeout`` seconds (None: none) without an answer."""
        conn = self.conns[rank]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._early[rank] and not conn.poll(POLL_SECONDS):
            for r, proc in enumerate(self.processes):  # a rank killed outright: the root cause
                if not proc.is_alive() and not self.conns[r].poll() and not self._early[r]:
                    raise RuntimeError(self._dead(r))
            self._raise_pending_error()  # may read this rank's own answer ahead: the loop checks
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"rank {rank} gave no answer within {timeout:.0f} s")
        if self._early[rank]:  # read while looking for another rank's error
            return self._answer_of(rank, self._early[rank].pop(0))
        try:
            msg = conn.recv()
        except EOFError:
            raise RuntimeError(self._dead(rank)) from None
        return self._answer_of(rank, msg)

    def _answer_of(self, rank, msg):
        if msg[0] == "error":
            self._raise(rank, msg[1])
        return msg[1]

    def _raise_pending_error(self) -> None:
        """Raise the errors the ranks have reported, a rank's own failure before a peer's lost
        connection (which is its consequence)."""
        errors = []
        for r, conn in enumerate(self.conns):
            try:
                while conn.poll():
                    self._early[r].append(conn.recv())  # kept: a good answer is read again by _recv
            except (EOFError, OSError):
                pass
            errors += [(r, msg[1]) for msg in self._early[r] if msg[0] == "error"]
        if errors:
            errors.sort(key=lambda e: "onnection" in e[1][1])
            self._raise(*errors[0])

    @staticmethod
    def _raise(rank, error):
        kind, text = error
        if kind == "ValueError":  # bad input (a size the ranks do not divide): the user's to fix
            raise ValueError(f"rank {rank}: {text}")
        raise RuntimeError(f"rank {rank} failed: {kind}: {text}")

    def _dead(self, rank: int) -> str:
        proc = self.processes[rank]
        return f"rank {rank} (pid {proc.pid}) died (exit code {proc.exitcode})"


register_executor("multiproc", MultiprocExecutor)
