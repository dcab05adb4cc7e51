"""`orca-compile serve`: the engine behind an OpenAI-compatible HTTP API, as a user starts it (a
process of its own, bound to loopback on a port the system picks).

The oracle: HF's greedy decoding of each prompt alone (tokens; the float64 tiny Llama) and HF's
float64 log-probs of those tokens, for requests sent at once from several clients, one of them
streamed; a request the engine refuses is a 400 naming the value and the limit while the others
are served; a client that leaves mid-stream does not stop the server; SIGTERM ends the process."""
from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from orca_compile.presets import load_model

PROMPTS = [[5, 17, 3, 99, 4, 8, 1, 2, 3], [42, 7], [8, 9, 10, 11, 12], [3, 1]]
MAX_TOKENS = [6, 8, 5, 7]


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}then{% endif %}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny Llama in float64 saved with a word-level tokenizer that has a chat template."""
    from tests.acceptance.test_load_and_text import build_tokenizer

    path = tmp_path_factory.mktemp("served")
    load_model("tiny-llama", dtype=torch.float64).save_pretrained(path)
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    proc = subprocess.Popen([sys.executable, "-m", "orca_compile.cli", "serve", str(checkpoint), "--port", "0",
                             "--served-model-name", "tiny-llama", "--max-num-seqs", "4", "--num-kv-blocks", "16",
                             "--block-size", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, port = [], []

    def read():  # uvicorn says where it listens; the rest is kept for a failure's message
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port.append(int(m.group(1)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not port and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert port, "".join(lines)[-3000:]
        yield proc, port[0], lines, reader
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=10)


def _post(port, body, timeout=120, path="/v1/completions"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        res = conn.getresponse()
        return res.status, res.read().decode()
    finally:
        conn.close()


def _stream(port, body, stop_after=None, timeout=120, path="/v1/completions"):
    """The events of a streamed completion (``stop_after``: hang up after that many)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    events = []
    try:
        conn.request("POST", path, json.dumps(dict(body, stream=True)),
                     {"Content-Type": "application/json"})
        res = conn.getresponse()
        assert res.status == 200 and res.getheader("content-type").startswith("text/event-stream")
        for raw in res:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: "), line
            events.append(line[6:])
            if line == "data: [DONE]" or (stop_after is not None and len(events) >= stop_after):
                break
    finally:
        conn.close()
    return events


def _hf(prompt, n):
    model = load_model("tiny-llama", dtype=torch.float64)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        tokens = ids[len(prompt):]
        logits = model(torch.tensor([ids[:-1]])).logits[0, len(prompt) - 1:]
    return tokens, torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def test_concurrent_clients_get_hf_tokens_and_log_probs_and_a_bad_one_fails_alone(server):
    _, port, _, _ = server
    body = lambda i: {"model": "tiny-llama", "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS[i], "temperature": 0,
                      "logprobs": 1, "ignore_eos": True}
    results = {}

    def client(i):
        time.sleep(0.05 * i)  # staggered: later ones join a batch already decoding
        if i == 3:
            results[i] = _stream(port, body(i))
        elif i == 4:  # a token id outside the vocabulary (256)
            results[i] = _post(port, dict(body(0), prompt=[5, 300]))
        else:
            results[i] = _post(port, body(i))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads)

    status, text = results[4]
    assert status == 400 and "token id 300 is outside the vocabulary [0, 256)" in json.loads(text)["error"]["message"]
    for i in range(3):
        status, text = results[i]
        assert status == 200, text
        out = json.loads(text)
        choice = out["choices"][0]
        tokens, logprobs = _hf(PROMPTS[i], MAX_TOKENS[i])
        assert choice["token_ids"] == tokens and choice["finish_reason"] == "length"
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(logprobs, abs=1e-9)
        assert out["usage"] == {"prompt_tokens": len(PROMPTS[i]), "completion_tokens": MAX_TOKENS[i],
                                "total_tokens": len(PROMPTS[i]) + MAX_TOKENS[i]}
    events = results[3]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    tokens, logprobs = _hf(PROMPTS[3], MAX_TOKENS[3])
    assert [t for c in chunks for t in c["token_ids"]] == tokens
    assert [lp for c in chunks for lp in c["logprobs"]["token_logprobs"]] == pytest.approx(logprobs, abs=1e-9)
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    m = _metrics(port)
    assert m[("orca_requests_finished_total", "length")] == 4 and m[("orca_requests_refused_total", None)] == 1, m
    assert m[("orca_generation_tokens_total", None)] == sum(MAX_TOKENS) and m[("orca_kv_blocks_used", None)] == 0


def test_refusals_name_the_value_and_the_limit(server):
    _, port, _, _ = server
    cases = [({"prompt": [1], "max_tokens": 0}, 400, "max_tokens must be an integer >= 1, got 0"),
             ({"prompt": [1], "max_tokens": 600}, 400, "exceeds the model's context of 512 tokens"),
             ({"prompt": "the cat", "max_tokens": 100}, 400, "needs 26 KV blocks of 4 tokens; the cache has 16 in all"),
             ({"prompt": [1], "n": 2}, 400, "n is not supported: it must be 1 or absent, got 2"),
             ({"prompt": [1], "stop": ["\n"]}, 400, "stop is not supported (use stop_token_ids)"),
             ({"prompt": [1], "presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
             ({"prompt": [1], "logprobs": 5}, 400, "logprobs must be 0 or 1"),
             ({"prompt": [1], "temperature": "hot"}, 400, "temperature must be a number, got 'hot'"),
             ({"prompt": [1], "ignore_eos": "true"}, 400, "ignore_eos must be true or false, got 'true'"),
             ({"prompt": [1], "priority": 1.5}, 400, "priority must be an integer"),
             ({"prompt": [1], "model": "gpt-4"}, 404, "model 'gpt-4' is not served here")]
    for body, status, message in cases:
        got, text = _post(port, body)
        assert got == status and message in json.loads(text)["error"]["message"], (body, got, text)
    # null is "the default", as OpenAI's clients send unset fields; unknown fields are ignored
    got, text = _post(port, {"prompt": [1, 2], "max_tokens": 2, "n": None, "stream": None, "stop": None,
                             "temperature": None, "top_k": None, "user": "someone"})
    assert got == 200 and len(json.loads(text)["choices"][0]["token_ids"]) == 2, text
    # a streamed request the engine refuses is an HTTP error too, before any event
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [5, 300], "stream": True}))
    res = conn.getresponse()
    assert res.status == 400 and "token id 300 is outside the vocabulary" in res.read().decode()
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", b"{not json", {"Content-Type": "application/json"})
    res = conn.getresponse()
    assert res.status == 400 and "not JSON" in res.read().decode()
    conn.close()


def _tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def test_text_and_chat_completions_give_hf_tokens_and_their_decoding(server, checkpoint):
    _, port, _, _ = server
    tok = _tokenizer(checkpoint)
    # a text prompt: the tokenizer's ids, HF's greedy continuation, its decoding as the text
    status, text = _post(port, {"prompt": "the cat sat on", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert status == 200, text
    choice = json.loads(text)["choices"][0]
    tokens, _ = _hf(tok.encode("the cat sat on"), 6)
    assert choice["token_ids"] == tokens and choice["text"] == tok.decode(tokens, skip_special_tokens=True)
    # a chat: the messages through the chat template, the assistant's turn opened
    messages = [{"role": "user", "content": "dog ran to"}, {"role": "assistant", "content": "the park"},
                {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "then"}]}]
    flat = [dict(m, content="and then") if isinstance(m["content"], list) else m for m in messages]
    ids = tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ids) == "<unk> dog ran to <unk> the park <unk> and then then"  # roles: not words of it
    tokens, logprobs = _hf(ids, 5)
    body = {"messages": messages, "max_completion_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": True}
    status, text = _post(port, body, path="/v1/chat/completions")
    assert status == 200, text
    out = json.loads(text)
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["token_ids"] == tokens
    assert choice["message"]["content"] == tok.decode(tokens, skip_special_tokens=True)
    assert [c["token"] for c in choice["logprobs"]["content"]] == tok.convert_ids_to_tokens(tokens)
    assert [c["logprob"] for c in choice["logprobs"]["content"]] == pytest.approx(logprobs, abs=1e-9)
    assert out["usage"]["prompt_tokens"] == len(ids)
    # streamed: the role first, the deltas join into the same content
    events = _stream(port, body, path="/v1/chat/completions")
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == choice["message"]["content"]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == tokens
    # what a chat cannot ask for here
    for bad, message in (({"messages": []}, "messages must be a non-empty list"),
                         ({"messages": messages, "tools": [{"type": "function"}]}, "tools is not supported"),
                         ({"messages": messages, "response_format": {"type": "json_object"}}, "only text"),
                         ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts")):
        status, text = _post(port, bad, path="/v1/chat/completions")
        assert status == 400 and message in json.loads(text)["error"]["message"], (bad, status, text)


def _metrics(port) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        res = conn.getresponse()
        assert res.status == 200
        text = res.read().decode()
    finally:
        conn.close()
    return {(sample.name, sample.labels.get("reason")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_a_client_that_leaves_mid_stream_is_aborted_the_server_goes_on_and_sigterm_ends_it(server):
    proc, port, lines, reader = server
    before = _metrics(port)
    assert before[("orca_requests_finished_total", "abort")] == 0 and before[("orca_kv_blocks_total", None)] == 16
    events = _stream(port, {"prompt": [5, 17, 3], "max_tokens": 50, "temperature": 0, "ignore_eos": True},
                     stop_after=2)
    assert len(events) == 2 and json.loads(events[0])["choices"][0]["finish_reason"] is None
    # the engine hears of it between iterations: the request is aborted, its blocks freed
    deadline = time.monotonic() + 30
    while (m := _metrics(port))[("orca_requests_finished_total", "abort")] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m[("orca_requests_finished_total", "abort")] == 1, m
    assert m[("orca_generation_tokens_total", None)] < before[("orca_generation_tokens_total", None)] + 50
    assert m[("orca_num_requests_running", None)] == 0 and m[("orca_kv_blocks_used", None)] == 0
    status, text = _post(port, {"prompt": [42, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert status == 200 and json.loads(text)["choices"][0]["token_ids"] == _hf([42, 7], 8)[0]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down (the engine's thread aborts what is left), then re-raises the signal so a
    # process manager sees how it ended
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM), "".join(lines)[-3000:]
    reader.join(timeout=30)  # it ends with the process's stderr
    assert any("Application shutdown complete" in line for line in lines), "".join(lines)[-3000:]


class _FailingEngine:
    """An engine whose iteration breaks after the first request is in (what a dead worker does)."""

    def __init__(self, fail_in):
        self.fail_in, self.requests = fail_in, []

    def stats(self):
        return {k: 0 for k in ("num_waiting", "num_running", "kv_blocks_used", "kv_blocks_total", "num_iterations",
                               "num_generated_tokens", "num_computed_tokens", "num_preemptions")}

    def add_request(self, request_id, prompt, params, priority=0):
        if self.fail_in == "add_request":
            raise RuntimeError("the engine is shut down")
        self.requests.append(request_id)

    def abort_request(self, request_id):
        return None

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        raise RuntimeError("the workers failed: rank 1 exited")


@pytest.mark.parametrize("fail_in", ["step", "add_request"])
def test_an_engine_failure_reaches_every_waiting_request_and_refuses_new_ones(fail_in):
    from orca_compile.runtime.engine_loop import EngineLoop

    loop = EngineLoop(_FailingEngine(fail_in))
    got = {name: threading.Event() for name in ("a", "b")}
    items = {}

    def sink(name):
        return lambda item: (items.setdefault(name, item), got[name].set())

    loop.submit("a", [1, 2], None, 0, sink("a"))
    loop.submit("b", [3], None, 0, sink("b"))
    loop.start()
    assert all(e.wait(10) for e in got.values()), items  # nobody waits forever
    assert all(isinstance(item, RuntimeError) for item in items.values()), items
    assert loop.error is not None and ("rank 1 exited" in loop.error or "shut down" in loop.error)
    with pytest.raises(RuntimeError, match="the engine failed"):  # /health is 503 and new requests too
        loop.submit("c", [1], None, 0, lambda item: None)
    assert loop.stop(timeout=5)

