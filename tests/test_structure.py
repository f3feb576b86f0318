"""The code's layout: no import cycles, the model layer apart from training code, test helpers kept to tests.

Imports are read from the source (ast), every one of them: at module level, inside functions, and
``from package import submodule``. Each checker is first shown to fail on a small made-up case.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vlm", "eval")  # every module of these is a node of the import graph
SCRIPTS = ("chat.py", "train_projector.py")  # commands at the repository root, checked like modules
# Who may import the synthetic-data generator and the tiny-model builders.
TEST_HELPERS = ("vlm.testing", "vlm.synth")
TEST_HELPER_HOMES = ("vlm.testing", "vlm.synth")  # the helpers themselves (tests/, tools/, benchmarks/ are not scanned)
TRAINING = ("vlm.data", "vlm.train")
NOTE = re.compile(rb"build [0-9]")  # "build 3 measured ...": history belongs in git and docs/, not in code


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_under(root: Path, packages: Iterable[str], scripts: Iterable[str] = ()) -> dict[str, Path]:
    """Dotted module name -> file, for every .py in ``packages`` and the named top-level ``scripts``."""
    found = {_module_name(p, root): p for package in packages for p in sorted((root / package).rglob("*.py"))}
    found.update({Path(s).stem: root / s for s in scripts if (root / s).is_file()})
    return found


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _runtime_nodes(tree: ast.AST) -> Iterable[ast.AST]:
    """Every node, except inside ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (a function's imports included; not those
    under ``if TYPE_CHECKING:``, which only annotations read)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # "from pkg import sub" imports the submodule pkg.sub when there is one, else a name from pkg.
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:  # "import vlm.data.templates.x": the module part
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or through others: module -> the module that imports it."""
    seen, todo = {start: ""}, [start]
    while todo:
        node = todo.pop()
        for target in sorted(graph.get(node, ())):
            if target not in seen:
                seen[target] = node
                todo.append(target)
    del seen[start]
    return seen


def _chain(via: dict[str, str], start: str, end: str) -> str:
    chain = [end]
    while chain[-1] != start and via.get(chain[-1]):
        chain.append(via[chain[-1]])
    return " -> ".join(reversed(chain))


def forbidden_imports(graph: dict[str, set[str]], targets: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """``importer -> imported`` for every import of ``targets`` (prefixes) by a module outside ``allowed``."""
    targets, allowed = tuple(targets), tuple(allowed)
    return [f"{name} -> {target}" for name, imported in sorted(graph.items()) if not _within(name, allowed)
            for target in sorted(imported) if _within(target, targets)]


def private_imports(modules: dict[str, Path]) -> list[str]:
    """``importer: module._name`` for every private name one project module imports from another."""
    found = []
    for name, path in sorted(modules.items()):
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "") in modules:
                found += [f"{name}: {node.module}.{alias.name}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def build_notes(folders: Iterable[Path]) -> list[str]:
    """``file:line`` of every "build <number>" in the files under ``folders`` (as ``grep -rn`` would find)."""
    hits = []
    for folder in folders:
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            for number, line in enumerate(file.read_bytes().splitlines(), 1):
                if NOTE.search(line):
                    hits.append(f"{file.relative_to(folder.parent)}:{number}")
    return hits


# ---- the checkers fail where they should --------------------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    return import_graph(modules_under(tmp_path, ["p"]))


def test_cycle_finder_names_the_cycle_and_passes_an_acyclic_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    graph["c"] = {"d"}
    assert find_cycle(graph) is None


def test_imports_inside_functions_relative_and_of_submodules_are_edges(tmp_path):
    graph = _package(tmp_path, {
        "p/__init__.py": "",
        "p/a.py": "import os\n\ndef f():\n    from p import b  # a submodule, inside a function\n",
        "p/b.py": "from . import c\n",
        "p/c.py": "from p.a import f\nimport p.sub.d\n",
        "p/sub/__init__.py": "", "p/sub/d.py": "from .. import a\nfrom ..b import thing\nfrom p import VERSION\n",
        "p/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\nelse:\n    import p.b\n",
    })
    assert graph == {"p": set(), "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a", "p.sub.d"}, "p.sub": set(),
                     "p.sub.d": {"p.a", "p.b", "p"}, "p.typed": {"p.b"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]


def test_layer_checks_name_the_offending_import():
    graph = {"vlm.model": {"vlm.loading"}, "vlm.loading": {"vlm.data.templates"}, "vlm.data.templates": set(),
             "vlm.synth": {"vlm.testing"}, "eval.vqa": {"vlm.synth.panels"}}
    assert forbidden_imports(graph, TEST_HELPERS, TEST_HELPER_HOMES) == ["eval.vqa -> vlm.synth.panels"]
    via = reachable(graph, "vlm.model")
    assert _chain(via, "vlm.model", "vlm.data.templates") == "vlm.model -> vlm.loading -> vlm.data.templates"


def test_private_import_finder_names_the_name(tmp_path):
    _package(tmp_path, {"p/__init__.py": "", "p/a.py": "_x = 1\n__version__ = '1'\n",
                        "p/b.py": "from p.a import _x, __version__\n"})
    assert private_imports(modules_under(tmp_path, ["p"])) == ["p.b: p.a._x"]


def test_build_note_finder_finds_one(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("lr: 1e-3  # kept from build 7\n")
    (tmp_path / "configs" / "b.yaml").write_text("lr: 1e-3  # rebuild after 7 steps\n")
    assert build_notes([tmp_path / "configs"]) == ["configs/a.yaml:1"]


# ---- the project ----------------------------------------------------------------------------------------
def _project_graph() -> dict[str, set[str]]:
    return import_graph(modules_under(ROOT, PACKAGES, SCRIPTS))


def test_no_import_cycles():
    cycle = find_cycle(_project_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_only_tests_tools_and_benchmarks_use_the_synthetic_data_and_tiny_models():
    offending = forbidden_imports(_project_graph(), TEST_HELPERS, TEST_HELPER_HOMES)
    assert not offending, f"imports of test helpers outside tests/, tools/, benchmarks/: {', '.join(offending)}"


def test_the_model_layer_imports_no_training_code():
    graph = _project_graph()
    for start in ("vlm.model", "vlm.loading", "vlm.session"):
        via = reachable(graph, start)
        wrong = [_chain(via, start, name) for name in sorted(via) if _within(name, TRAINING)]
        assert not wrong, f"{start} imports training code: {'; '.join(wrong)}"
    # Only training, the data tools and the commands (a __main__) read the data pipeline.
    readers = {name: imported for name, imported in graph.items()
               if name.startswith("vlm.") and not name.endswith("__main__")}
    offending = forbidden_imports(readers, ["vlm.data"], TRAINING)
    assert not offending, f"vlm.data imported outside training: {', '.join(offending)}"


def test_no_module_imports_another_modules_private_names():
    offending = private_imports(modules_under(ROOT, PACKAGES, SCRIPTS))
    assert not offending, f"private names imported across modules (make them public): {', '.join(offending)}"


def test_no_build_numbers_in_code_or_configs():
    hits = build_notes([ROOT / name for name in ("vlm", "eval", "benchmarks", "configs")])
    assert not hits, f"'build <n>' notes (history belongs in docs/): {', '.join(hits)}"


def test_the_package_exports_what_it_lists():
    import vlm

    assert sorted(vlm.__all__) == sorted(vlm._HOMES)
    assert all(getattr(vlm, name) is not None for name in vlm.__all__)
