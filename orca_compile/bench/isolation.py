"""Each system in a process of its own: spawned, set up once, timed on request.

So that none runs under another's process-wide state: the engine tunes glibc's malloc for the
whole process, and HF continuous batching, which spends more CPU in the kernel than in user code,
ran under that tuning when it shared the engine's process (docs/benchmarks.md)."""
from __future__ import annotations

import dataclasses
import os

import torch

from orca_compile.bench import systems
from orca_compile.bench.workloads import WORKLOADS


def _system_worker(conn, workload, system, reqs, engine_kwargs, threads, device=None):
    """A system in a process of its own (``run(isolate=True)``): loads the workload's model (onto
    ``device``), sets the system up, then times one pass per request from the parent until it
    sends None. ``workload``: a name in ``WORKLOADS`` or a ``Workload`` (one with its dtype
    changed: ``run(dtype=)``)."""
    if threads:
        torch.set_num_threads(threads)
    w = WORKLOADS[workload] if isinstance(workload, str) else workload
    # a multi-process engine's workers, or an engine given a checkpoint path, load the model themselves
    timed = systems.prepare(system, systems.load_for(system, w, engine_kwargs, device), reqs, engine_kwargs,
                            workload=w, device=device)
    conn.send("ready")
    try:
        while conn.recv() is not None:
            res, tokens = timed()
            res.extra["pid"] = os.getpid()
            conn.send((dataclasses.asdict(res), tokens))
    except EOFError:  # the parent went away
        pass
    finally:
        if hasattr(timed, "shutdown"):
            timed.shutdown()


class Isolated:
    """The parent's handle on a ``_system_worker``: set up on creation, one timed pass per call."""

    def __init__(self, workload, system, reqs, engine_kwargs, threads, device=None):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the parent's state
        self.conn, child = ctx.Pipe()
        # not a daemon: a tensor-parallel engine starts worker processes of its own, which a
        # daemon may not; close() stops it, and it exits by itself when the parent's pipe closes
        self.process = ctx.Process(target=_system_worker,
                                   args=(child, workload, system, reqs, engine_kwargs, threads, device))
        self.process.start()
        child.close()
        if self._recv() != "ready":
            raise RuntimeError(f"the {system} worker did not start")

    def _recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the benchmark worker died (exit code {self.process.exitcode})") from None

    def __call__(self):
        self.conn.send("run")
        res, tokens = self._recv()
        return systems.Result(**res), tokens

    def close(self):
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):  # it died already
            pass
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.terminate()


