"""The runtime's seams: another executor and another scheduling policy plug in by name, without a
change to the engine; the engine releases its executor on shutdown() and at the end of a with."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import orca_compile
from orca_compile import SamplingParams
from orca_compile.runtime.executor import LocalExecutor, register_executor, unregister_executor
from orca_compile.runtime.policy import SchedulingPolicy, register_policy, unregister_policy
from tests.conftest import compiled_preset


class RecordingExecutor(LocalExecutor):
    """Runs like the local executor and records what it was asked to do."""

    instances: list["RecordingExecutor"] = []

    def __init__(self, source, seed=0):
        super().__init__(source, seed)
        self.calls = []
        self.shutdowns = 0
        RecordingExecutor.instances.append(self)

    def init_kv_cache(self, num_blocks, block_size):
        self.calls.append(("init_kv_cache", num_blocks, block_size))
        super().init_kv_cache(num_blocks, block_size)

    def execute(self, out):
        self.calls.append(("execute", list(out.request_ids), [len(t) for t in out.new_token_ids]))
        return super().execute(out)

    def shutdown(self):
        self.shutdowns += 1
        super().shutdown()


@pytest.fixture
def recording():
    register_executor("recording", RecordingExecutor)
    RecordingExecutor.instances.clear()
    yield RecordingExecutor.instances
    unregister_executor("recording")


def _hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_an_executor_registered_by_name_runs_the_engine(recording):
    model, cm = compiled_preset("tiny-llama")
    prompts = [[5, 17, 3, 99, 4], [42, 7], [8, 9, 10]]
    with orca_compile.optimize(cm, executor="recording", max_num_seqs=2, num_kv_blocks=16, block_size=4) as eng:
        outs = eng.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    assert [o.token_ids for o in outs] == [_hf_greedy(model, p, 4) for p in prompts]
    (executor,) = recording
    assert executor.calls[0] == ("init_kv_cache", 16, 4)
    steps = [c for c in executor.calls if c[0] == "execute"]
    assert len(steps) == eng.num_iterations
    # the first iteration admits two prompts whole (max_num_seqs=2), the third joins when one leaves
    assert steps[0][1:] == (["generate-0", "generate-1"], [5, 2])
    assert any("generate-2" in ids for _, ids, _ in steps[1:])
    assert executor.shutdowns == 1  # the with block


def test_shutdown_releases_the_executor_once_and_the_engine_refuses_work(recording):
    _, cm = compiled_preset("tiny-llama")
    eng = orca_compile.optimize(cm, executor="recording", num_kv_blocks=8)
    eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3))
    eng.step()
    eng.shutdown()
    eng.shutdown()
    (executor,) = recording
    assert executor.shutdowns == 1 and executor.runner is None
    assert eng.is_shut_down and not eng.has_unfinished_requests()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.step()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.add_request("b", [1], SamplingParams(max_tokens=1))


def test_the_local_executor_lets_go_of_the_model_and_cache_at_shutdown():
    from orca_compile.presets import load_model

    with orca_compile.optimize(load_model("tiny-gpt2", dtype=torch.float32), num_kv_blocks=8) as eng:
        eng.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
        model = weakref.ref(eng.executor.runner.model)
        cache = weakref.ref(eng.executor.runner.kv_cache[0][0])
    gc.collect()
    assert model() is None and cache() is None


def test_a_failed_engine_start_shuts_its_executor_down(recording):
    _, cm = compiled_preset("tiny-llama")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        orca_compile.optimize(cm, executor="recording", num_kv_blocks=8, max_model_len=10_000)
    (executor,) = recording
    assert executor.shutdowns == 1


class LastComeFirstServed(SchedulingPolicy):
    """A toy: the latest arrival is served (and admitted) first."""

    def key(self, req):
        return -req.arrival


@pytest.fixture
def lcfs():
    register_policy("lcfs", LastComeFirstServed)
    yield
    unregister_policy("lcfs")


def _finish_order(policy):
    model, cm = compiled_preset("tiny-llama")
    prompts = {"a": [1, 2, 3], "b": [4, 5], "c": [6, 7, 8, 9]}
    order, tokens = [], {}
    with orca_compile.optimize(cm, policy=policy, max_num_seqs=1, num_kv_blocks=16, block_size=4) as eng:
        for rid, p in prompts.items():
            eng.add_request(rid, p, SamplingParams(max_tokens=3, ignore_eos=True))
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    order.append(out.request_id)
                    tokens[out.request_id] = out.token_ids
    assert tokens == {rid: _hf_greedy(model, p, 3) for rid, p in prompts.items()}
    return order


def test_a_policy_registered_by_name_sets_the_order_of_service(lcfs):
    assert _finish_order("fcfs") == ["a", "b", "c"]
    assert _finish_order("lcfs") == ["c", "b", "a"]


def test_unknown_names_and_bad_registrations_are_refused():
    _, cm = compiled_preset("tiny-llama")
    with pytest.raises(ValueError, match="unknown policy 'nope'; one of fcfs"):
        orca_compile.optimize(cm, policy="nope", num_kv_blocks=8)
    with pytest.raises(ValueError, match="unknown executor 'nope'; one of local"):
        orca_compile.optimize(cm, executor="nope", num_kv_blocks=8)
    with pytest.raises(ValueError, match="taken by FCFS"):
        register_policy("fcfs", LastComeFirstServed)
    with pytest.raises(ValueError, match="must subclass Executor"):
        register_executor("x", object)


def _build_in_worker(spec, conn):
    model = spec.build()
    conn.send((model.vocab_size, model.num_layers, model.backend, type(model.graph_module).__name__))


def test_a_worker_process_builds_its_own_model_from_the_picklable_spec():
    """What a process-per-device executor will do: send the description, not the model."""
    import multiprocessing
    import pickle

    spec = orca_compile.ModelSpec("tiny-llama", backend="eager", dtype="float32")
    assert pickle.loads(pickle.dumps(spec)) == spec
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=_build_in_worker, args=(spec, child), daemon=True)
    worker.start()
    try:
        assert parent.poll(120), "the worker built nothing within 120 s"
        vocab, layers, backend, kind = parent.recv()
    finally:
        worker.join(timeout=30)
        if worker.is_alive():
            worker.kill()
    _, cm = compiled_preset("tiny-llama")
    assert (vocab, layers, backend, kind) == (cm.vocab_size, cm.num_layers, "eager", "GraphModule")
    assert worker.exitcode == 0
