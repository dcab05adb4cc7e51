"""Incremental detokenization (runtime/detokenizer.py) against the tokenizer's own decode of the
whole output, with a byte-level BPE tokenizer built offline (GPT-2's kind: a character outside
ASCII spans several tokens, one byte each)."""
import pytest

from orca_compile.runtime.detokenizer import Detokenizer
from orca_compile.runtime.request import Request, RequestOutput, RequestStatus, SamplingParams

TEXT = "the cat sat on the mat. Zoë's café: 😀 naïve 日本 — done"


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the cat sat on the mat", "the dog ran to the park"] * 20, vocab_size=300,
                            min_frequency=2, special_tokens=["<eos>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")


class CountingTokenizer:
    """Passes decode through, recording how many tokens each call decoded."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kw)


def _stream(tokenizer, ids, steps, abort=False, special=None):
    """Outputs of a request fed ``ids`` in steps of the given sizes, as the engine makes them
    (``abort``: one more output, as ``abort_request`` makes it after the last step)."""
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=len(ids) + abort, ignore_eos=True), 0)
    detok = Detokenizer(tokenizer, req, special)
    outs, i = [], 0
    for k in steps:
        for t in ids[i:i + k]:
            req.append_token(t, None)
        i += k
        outs.append(RequestOutput.of(req, ids[i - k:i], detok))
    if abort:
        req.status = RequestStatus.FINISHED_ABORT
        outs.append(RequestOutput.of(req, [], detok))
    return outs


def test_the_pieces_join_into_the_whole_decode(tokenizer):
    ids = tokenizer.encode(TEXT) + [tokenizer.eos_token_id]
    assert len(ids) > len(TEXT.split())  # the non-ASCII characters span several byte tokens
    outs = _stream(tokenizer, ids, [1] * len(ids))
    pieces = [o.new_text for o in outs]
    assert "".join(pieces) == outs[-1].text == tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert all("\ufffd" not in p for p in pieces)  # no half character is ever emitted
    # the emoji is four byte tokens: three steps emit nothing, the fourth the whole character
    assert "😀" in pieces and "" in pieces
    for o in outs:  # text is at each step the decode of what came so far, up to a held-back char
        assert tokenizer.decode(o.token_ids, skip_special_tokens=True).startswith(o.text)


def test_steps_of_several_tokens_and_reading_late(tokenizer):
    ids = tokenizer.encode(TEXT)
    steps = [5, 1, 3] * (len(ids) // 9) + [len(ids) % 9]
    in_order = [o.new_text for o in _stream(tokenizer, ids, steps)]
    outs = _stream(tokenizer, ids, steps)
    # the last output read first, then the others backwards: the same pieces as in order
    assert outs[-1].text == TEXT
    assert [o.new_text for o in reversed(outs)][::-1] == in_order
    assert "".join(in_order) == TEXT and any(p == "" for p in in_order)  # some step held a byte back
    assert all(a.text + b.new_text == b.text for a, b in zip(outs, outs[1:]))


def test_each_step_decodes_a_window_not_the_whole_output(tokenizer):
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode(TEXT * 8)
    outs = _stream(counting, ids, [1] * len(ids))
    for o in outs:
        o.new_text
    assert "".join(o.new_text for o in outs) == TEXT * 8
    # a window holds the previous step's tokens and this step's, plus a character's held-back bytes
    assert len(ids) > 150 and max(counting.sizes) <= 8


def test_a_final_partial_character_is_emitted_as_decode_would(tokenizer):
    ids = tokenizer.encode("ok 😀")[:-1]  # the emoji's last byte never came
    outs = _stream(tokenizer, ids, [1] * (len(ids) - 1) + [1])
    assert outs[-1].finished and outs[-1].text == tokenizer.decode(ids, skip_special_tokens=True)
    assert outs[-1].text.endswith("\ufffd") and "".join(o.new_text for o in outs) == outs[-1].text


def test_without_a_tokenizer_there_is_no_text():
    req = Request("r", [1], SamplingParams(max_tokens=2), 0)
    req.append_token(5, None)
    out = RequestOutput.of(req, [5])
    assert out.text is None and out.new_text is None


def test_an_abort_emits_what_was_held_back_whichever_output_is_read_first(tokenizer):
    ids = tokenizer.encode("ok 😀")[:-1]  # aborted inside the emoji: its last byte never came
    for abort_first in (False, True):
        outs = _stream(tokenizer, ids, [1] * len(ids), abort=True)
        assert outs[-1].finished and outs[-1].finish_reason == "abort" and not outs[-2].finished
        if abort_first:
            assert outs[-1].text == tokenizer.decode(ids, skip_special_tokens=True)
        pieces = [o.new_text for o in outs]
        # the steps inside the emoji held their bytes back; the abort's output carries them
        assert pieces[-1] == "\ufffd" and all("\ufffd" not in o.text for o in outs[:-1])
        assert "".join(pieces) == outs[-1].text == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_run_of_special_tokens_does_not_widen_the_window(tokenizer):
    counting = CountingTokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("the cat") + [eos] * 300 + tokenizer.encode(" sat")
    outs = _stream(counting, ids, [1] * len(ids), special=frozenset(tokenizer.all_special_ids))
    assert "".join(o.new_text for o in outs) == outs[-1].text == "the cat sat"
    assert max(counting.sizes) <= 8 and sum(counting.sizes) < 20 * len(ids)
