"""A rank's gloo process group ends with ``destroy_process_group``: its worker threads are joined
then, not left running into the interpreter's finalisation (where one of them freeing its last
collective's tensors aborts the process: ``runtime/executor.py``, ``join_process_group``).

Two processes on 127.0.0.1 join a group, do what a rank does (``torch.export`` imports
``torch._dynamo`` while it builds the graph; a broadcast), destroy the group and list the threads
still alive; the ranks that joined through ``join_process_group`` must then exit cleanly too. The
control joins with a plain ``init_process_group``: on torch 2.13 its gloo threads survive, which is
what shows this test can see the fault (should a torch release stop leaking the group, the control
fails and says the workaround can go); its ranks leave with ``os._exit``, since a normal exit with
those threads running aborts now and then (CI saw it: the fault this file guards against)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import communicate_all, free_loopback_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists threads in /proc/self/task")

RANK = textwrap.dedent("""
    import datetime, os, sys
    import torch.distributed as dist
    from orca_compile.runtime.executor import join_process_group
    assert "torch._dynamo" not in sys.modules, "imported before the group: the check would prove nothing"
    rank, port, how = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    join = join_process_group if how == "join_process_group" else dist.init_process_group
    join("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
         timeout=datetime.timedelta(seconds=60))
    import torch._dynamo  # what torch.export does while a rank builds its graph
    box = [("execute", rank)]
    dist.broadcast_object_list(box, src=0)
    assert box[0] == ("execute", 0)
    dist.destroy_process_group()
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    print("gloo threads:", sorted(n for n in names if "gloo" in n), flush=True)
    if how != "join_process_group":  # the leaked threads can abort the normal exit: the fault itself
        os._exit(0)
""")


def _gloo_threads_after_destroy(how: str) -> list[str]:
    port = str(free_loopback_port())
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), port, how], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = communicate_all(ranks, timeout=120)
    lines = []
    for p, (out, err) in zip(ranks, outs):
        assert p.returncode == 0, err[-2000:]
        lines += [line for line in out.splitlines() if line.startswith("gloo threads:")]
    assert len(lines) == 2, outs
    return lines


def test_join_process_group_leaves_no_gloo_thread_after_destroy():
    assert _gloo_threads_after_destroy("join_process_group") == ["gloo threads: []"] * 2


def test_control_a_plain_init_leaks_the_group_on_this_torch():
    lines = _gloo_threads_after_destroy("init_process_group")
    assert all("pt_gloo_runloop" in line for line in lines), lines
