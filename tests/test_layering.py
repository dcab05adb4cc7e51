"""The import direction (docs/architecture.md): the compiler never imports the runtime, the runtime
never imports the passes, the kernels import neither. Every import is checked, including those
inside functions."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _files(*parts):
    return sorted((ROOT.joinpath(*parts)).rglob("*.py")) if len(parts) == 1 and ROOT.joinpath(*parts).is_dir() \
        else [ROOT.joinpath(*parts)]


RULES = [  # (files, forbidden module prefixes)
    (_files("orca_compile", "compiler.py"), ("orca_compile.runtime",)),
    (_files("passes"), ("orca_compile.runtime",)),
    (_files("runtime"), ("orca_compile.passes", "orca_compile.compiler")),
    (_files("kernels"), ("orca_compile.runtime", "orca_compile.passes", "orca_compile.compiler")),
]


@pytest.mark.parametrize("files,forbidden", RULES, ids=["compiler", "passes", "runtime", "kernels"])
def test_imports_go_one_way(files, forbidden):
    assert files, "no files found: the layout changed"
    bad = [f"{path.relative_to(ROOT)} imports {name}" for path in files for name in sorted(_imports(path))
           if name.startswith(forbidden)]
    assert bad == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from orca_compile.runtime import engine\n")
    assert "orca_compile.runtime" in _imports(f)
