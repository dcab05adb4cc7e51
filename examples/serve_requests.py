"""Drive the engine one iteration at a time: requests join between iterations, each one's text
(or token ids, for a model without a tokenizer) is printed as it comes, and one is aborted.

    python examples/serve_requests.py                    # the built-in tiny model, token ids
    python examples/serve_requests.py gpt2 "Hello" "The sky is"    # a checkpoint, text prompts
"""
from __future__ import annotations

import sys

import orca_compile
from orca_compile import SamplingParams


def main(model: str = "tiny-llama", prompts: list[str] | None = None) -> dict[str, str]:
    with orca_compile.optimize(model, max_num_seqs=4, max_num_batched_tokens=64) as engine:  # released at the end
        if engine.tokenizer is None:  # no tokenizer: token-id prompts, token ids out
            prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10]]
        prompts = prompts or ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Q: 2 + 2 = ?"]
        # one request now, the next ones arriving every other iteration; the last is aborted after 3
        pending = [(2 * i, i, p) for i, p in enumerate(prompts)]
        shown: dict[str, str] = {}
        iteration = 0
        while pending or engine.has_unfinished_requests():
            while pending and pending[0][0] <= iteration:
                _, i, prompt = pending.pop(0)  # seeded: each request's draws are its own, whatever shares the batch
                engine.add_request(f"req-{i}", prompt, SamplingParams(max_tokens=12, temperature=0.8, seed=i))
            for out in engine.step():
                piece = out.new_text if out.new_text is not None else " ".join(map(str, out.new_token_ids)) + " "
                shown[out.request_id] = shown.get(out.request_id, "") + piece
                if out.finished:
                    print(f"{out.request_id} done ({out.finish_reason}): {shown[out.request_id]!r}")
            iteration += 1
            if iteration == 3 + 2 * (len(prompts) - 1):
                out = engine.abort_request(f"req-{len(prompts) - 1}")
                if out is not None:
                    print(f"{out.request_id} aborted after {len(out.token_ids)} tokens")
        print(engine.stats())
    return shown


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama", sys.argv[2:] or None)
