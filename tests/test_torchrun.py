"""Two torchrun "nodes" on this machine (rendezvous on 127.0.0.1), one rank each: `orca-compile
generate` serves on rank 0 with the other rank following it, and prints what one process prints."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import communicate_all, free_loopback_port

ARGS = ["generate", "tiny-llama", "--dtype", "float64", "--prompt-ids", "5 17 3 99 4", "--prompt-ids", "42 7",
        "--max-tokens", "6", "--num-kv-blocks", "16", "--block-size", "4", "--logprobs"]


def test_two_torchrun_nodes_print_what_one_process_prints():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    one = subprocess.run([sys.executable, "-m", "orca_compile.cli", *ARGS], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    port = str(free_loopback_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
                               "-m", "orca_compile.cli", "-v", *ARGS],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    outs = communicate_all(nodes, timeout=300)
    for rank, (node, (out, err)) in enumerate(zip(nodes, outs)):
        assert node.returncode == 0, err[-3000:]
        # each rank built its own shard: 1 of tiny-llama's 2 KV heads
        assert f"torchrun rank {rank} of 2: built its shard (2 attention layers, 1 KV heads each)" in err
    assert outs[0][0] == one.stdout  # rank 0 prints the tokens and log-probs
    assert outs[1][0] == ""  # the follower prints nothing
    assert "tokens:" in one.stdout
