"""The scripts in examples/ run as a user would run them (on the built-in tiny model)."""
import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_requests(capsys):
    shown = _load("serve_requests").main("tiny-llama")
    out = capsys.readouterr().out
    # three requests ran to max_tokens, the fourth was aborted midway; the engine ends empty
    assert sorted(shown) == ["req-0", "req-1", "req-2", "req-3"]
    assert all(len(shown[f"req-{i}"].split()) == 12 for i in range(3)) and 0 < len(shown["req-3"].split()) < 12
    assert out.count("done (length)") == 3 and "req-3 aborted after" in out
    assert "'kv_blocks_used': 0" in out and "'num_running': 0" in out
