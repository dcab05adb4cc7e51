"""Where the model runs. Today: one runner in this process. Tensor- and pipeline-parallel
executors (one process per device over torch.distributed) take the same ``SchedulerOutput`` and
return the same ``RunnerOutput``, so the engine and scheduler do not change with the placement."""
from __future__ import annotations

from orca_compile.runtime.model_runner import ModelRunner, RunnerOutput
from orca_compile.runtime.scheduler import SchedulerOutput


class LocalExecutor:
    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(out)

    def release(self, request_ids: list[str]) -> None:
        """Drop per-request state (seeded generators) of requests that left the engine."""
        self.runner.sampler.forget(request_ids)

    def shutdown(self) -> None:
        pass
