"""OpenAI's completions and chat completions, as ``orca_compile/server.py`` serves them: a request
body read into a prompt and ``SamplingParams``, and the engine's outputs shaped into responses and
stream chunks.

Fields are OpenAI's, with vLLM's extensions ``top_k``, ``ignore_eos``, ``stop_token_ids`` and
``priority``; each choice also carries the generated ``token_ids``. A field sent as null takes
its default (OpenAI's clients send unset fields so); fields not known here are ignored, as OpenAI
does. Fields known but not implemented are refused with a ``ValueError`` (a 400) rather than
ignored, since a client relying on them would get silently different output: more than one
prompt or choice (``n``, ``best_of``), ``echo``, ``stop`` strings (``stop_token_ids`` instead),
``suffix``, ``logit_bias``, penalties, top-N log-probs (only the sampled token's log-prob is
computed), and in chats tools and structured output.
"""
from __future__ import annotations

from orca_compile.runtime.request import SamplingParams

# value meaning "not used" for each known field that is not implemented
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "stop": None, "suffix": None, "logit_bias": None,
                "presence_penalty": 0, "frequency_penalty": 0}
_UNSUPPORTED_CHAT = {"n": 1, "stop": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0,
                     "tools": None, "tool_choice": None, "functions": None, "function_call": None,
                     "top_logprobs": 0}


class Body:
    """A request body's fields, null read as the default, each checked for its type."""

    def __init__(self, body):
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        self.body = body

    def get(self, key, default=None):
        value = self.body.get(key)
        return default if value is None else value

    def number(self, key, default):
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return value

    def flag(self, key):
        value = self.get(key, False)
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value

    def refuse(self, unsupported: dict) -> None:
        for key, unused in unsupported.items():
            value = self.body.get(key)
            if value is not None and value != unused and value not in ("", [], {}):
                hint = " (use stop_token_ids)" if key == "stop" else ""
                raise ValueError(f"{key} is not supported{hint}: it must be {unused!r} or absent, got {value!r}")

    def sampling(self, max_tokens, logprobs: bool) -> SamplingParams:
        top_k = self.get("top_k", 0)
        if top_k == -1 and not isinstance(top_k, bool):  # vLLM's "off"
            top_k = 0
        return SamplingParams(max_tokens=max_tokens, temperature=self.number("temperature", 1.0), top_k=top_k,
                              top_p=self.number("top_p", 1.0), seed=self.body.get("seed"),
                              stop_token_ids=self.get("stop_token_ids", ()), ignore_eos=self.flag("ignore_eos"),
                              logprobs=logprobs)


def completion_request(body) -> tuple[object, SamplingParams, int, bool, bool]:
    """(prompt, sampling params, priority, stream, logprobs) of a ``/v1/completions`` body."""
    b = Body(body)
    prompt = b.body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise ValueError(f"one prompt per request (n prompts: send n requests), got {len(prompt)}")
        prompt = prompt[0]
    if not isinstance(prompt, (str, list)):
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    b.refuse(_UNSUPPORTED)
    logprobs = b.body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or logprobs not in (0, 1)):
        raise ValueError(f"logprobs must be 0 or 1 (the sampled token's log-prob only), got {logprobs!r}")
    params = b.sampling(b.get("max_tokens", 16), logprobs is not None)
    return prompt, params, b.get("priority", 0), b.flag("stream"), logprobs is not None


def chat_request(body, tokenizer, max_model_len: int) -> tuple[list[int], SamplingParams, int, bool, bool]:
    """(prompt token ids, sampling params, priority, stream, logprobs) of a ``/v1/chat/completions``
    body: the messages through the tokenizer's chat template, with the assistant's turn opened."""
    b = Body(body)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template (its tokenizer has none): use /v1/completions")
    messages = b.body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list, got {messages!r}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a role, got {m!r}")
        content = m.get("content")
        if isinstance(content, list):  # parts: only text ones can be served
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported, got {content!r}")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or text parts, got {content!r}")
        turns.append({"role": m["role"], "content": content})
    b.refuse(_UNSUPPORTED_CHAT)
    fmt = b.get("response_format", {"type": "text"})
    if not isinstance(fmt, dict) or fmt.get("type", "text") != "text":
        raise ValueError(f"response_format: only text is supported, got {fmt!r}")
    ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    max_tokens = b.get("max_completion_tokens", b.get("max_tokens", None))
    if max_tokens is None:  # OpenAI's: as many as the context leaves
        max_tokens = max(1, max_model_len - len(ids)) if max_model_len else 16
    params = b.sampling(max_tokens, b.flag("logprobs"))
    return list(ids), params, b.get("priority", 0), b.flag("stream"), params.logprobs


class CompletionShape:
    """``/v1/completions``' response and chunks."""

    object, chunk_object = "text_completion", "text_completion"

    def __init__(self, request_id, created, model_name, want_logprobs, tokenizer=None):
        self.head = {"id": request_id, "created": created, "model": model_name}
        self.want_logprobs = want_logprobs

    def choice(self, text, token_ids, logprobs, finish_reason) -> dict:
        return {"index": 0, "text": text, "token_ids": token_ids, "finish_reason": finish_reason,
                "logprobs": {"token_logprobs": logprobs, "top_logprobs": None} if self.want_logprobs else None}

    def chunk(self, item, first: bool) -> dict:
        return dict(self.head, object=self.chunk_object, choices=[self.choice(
            item["text"], item["token_ids"], item["logprobs"], item["finish_reason"] if item["finished"] else None)])

    def response(self, item, usage) -> dict:
        return dict(self.head, object=self.object, usage=usage, choices=[self.choice(
            item["text"], item["token_ids"], item["logprobs"], item["finish_reason"])])


class ChatShape(CompletionShape):
    """``/v1/chat/completions``' response and chunks: the text as the assistant's message (a
    ``delta`` in chunks, the role in the first); log-probs as ``{"content": [{token, logprob,
    bytes, top_logprobs: []}]}`` with the tokenizer's token strings."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, request_id, created, model_name, want_logprobs, tokenizer=None):
        super().__init__(request_id, created, model_name, want_logprobs)
        self.tokenizer = tokenizer

    def _logprobs(self, token_ids, logprobs):
        if not self.want_logprobs:
            return None
        tokens = self.tokenizer.convert_ids_to_tokens(token_ids)
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, lp in zip(tokens, logprobs)]}

    def chunk(self, item, first: bool) -> dict:
        delta = ({"role": "assistant"} if first else {}) | {"content": item["text"]}
        choice = {"index": 0, "delta": delta, "token_ids": item["token_ids"],
                  "logprobs": self._logprobs(item["token_ids"], item["logprobs"]),
                  "finish_reason": item["finish_reason"] if item["finished"] else None}
        return dict(self.head, object=self.chunk_object, choices=[choice])

    def response(self, item, usage) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": item["text"]},
                  "token_ids": item["token_ids"], "logprobs": self._logprobs(item["token_ids"], item["logprobs"]),
                  "finish_reason": item["finish_reason"]}
        return dict(self.head, object=self.object, usage=usage, choices=[choice])
