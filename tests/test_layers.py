"""The import layers of palmrl (DESIGN §2), read from the source with ast: no cycles, and no import
that runs against the layer order. Lazy imports inside functions count too: a cycle hidden in a
function body is still a cycle between two modules' responsibilities.

    {cli, api} → stages → {engine, checkpoint, data, generate, rl, serving, tracking, …} → {model, tokenizer}
        → {io, config, errors}

model imports only errors, config and io; rl only torch; data never imports model; engine and
checkpoint never import stages; only the CLI and the Python API (palmrl/api.py) import a stage
module, and stages share only stages/common.py; nothing but `python -m palmrl` and the API import
cli, and nothing imports the API (palmrl/__init__.py reaches it by name, lazily).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "palmrl"

# (importer prefix, imported prefixes it may use; None = anything in palmrl)
ONLY = {
    "palmrl.errors": (),
    "palmrl.io": ("palmrl.errors",),
    "palmrl.config": ("palmrl.errors",),
    "palmrl.model": ("palmrl.model", "palmrl.errors", "palmrl.config", "palmrl.io"),
    "palmrl.rl": ("palmrl.rl",),
    "palmrl.tokenizer": ("palmrl.errors", "palmrl.io"),
}
# (importer prefix, imported prefix) pairs that run against the layer order
FORBIDDEN = [
    ("palmrl.data", "palmrl.model"),
    ("palmrl.engine", "palmrl.stages"),
    ("palmrl.checkpoint", "palmrl.stages"),
    ("palmrl.serving", "palmrl.stages"),
    ("palmrl.selfinstruct", "palmrl.stages"),
    ("palmrl.stages", "palmrl.cli"),
    ("palmrl.", "palmrl.cli"),  # nothing imports the CLI (palmrl.__main__ is allowed below)
    ("palmrl.", "palmrl.api"),  # nor the Python API (`palmrl.load` reaches it lazily, by name)
]
# the two entry points: `python -m palmrl` runs the CLI; the Python API runs stages as the CLI does
ALLOWED = {("palmrl.__main__", "palmrl.cli"), ("palmrl.api", "palmrl.cli")}
ENTRY_POINTS = ("palmrl.cli", "palmrl.api")
SHARED_BY_STAGES = "palmrl.stages.common"  # the one stages module other stages may import


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the palmrl modules it imports (anywhere in its body)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_package else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from palmrl import checkpoint` imports the submodule palmrl.checkpoint
                subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in files]
                targets.update(subs or [source])
        graph[mod] = {t for t in targets if t in files and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(graph.items()):
        for target in sorted(targets):
            if (mod, target) in ALLOWED:
                continue
            for prefix, allowed in ONLY.items():
                if _within(mod, prefix) and not any(_within(target, a) for a in allowed):
                    bad.append(f"{mod} -> {target} (only {', '.join(allowed) or 'nothing in palmrl'} allowed)")
            for low, high in FORBIDDEN:
                if _within(mod, low) and _within(target, high):
                    bad.append(f"{mod} -> {target} ({low.rstrip('.') or 'palmrl'} must not import {high})")
            if _within(target, "palmrl.stages") and target not in ("palmrl.stages", SHARED_BY_STAGES):
                if not (mod in ENTRY_POINTS or mod in ("palmrl.stages", SHARED_BY_STAGES)):
                    bad.append(f"{mod} -> {target} (only the CLI and the API run a stage; stages share "
                               f"{SHARED_BY_STAGES} only)")
            elif target == SHARED_BY_STAGES and not _within(mod, "palmrl.stages"):
                bad.append(f"{mod} -> {target} (stage helpers are for stages; move what you need down a layer)")
    return bad


def test_no_import_cycles():
    assert cycles(import_graph(PACKAGE)) == []


def test_imports_follow_the_layers():
    assert layer_violations(import_graph(PACKAGE)) == []


def test_the_checks_catch_a_planted_cycle_and_an_upward_import(tmp_path):
    """The checker itself: a copy of palmrl with one import added at the bottom of model/palm.py."""
    import shutil

    copy = tmp_path / "palmrl"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.jsonl"))
    palm = copy / "model" / "palm.py"
    palm.write_text(palm.read_text() + "\n\ndef _planted():\n    from palmrl.checkpoint import load  # noqa\n")
    graph = import_graph(copy)
    assert any("palmrl.model.palm" in c and "palmrl.checkpoint" in c for c in cycles(graph))
    assert "palmrl.model.palm -> palmrl.checkpoint" in " ".join(layer_violations(graph))


def test_scripts_import_only_what_palmrl_has():
    """scripts/ (benchmarks, the GPU step) import palmrl names inside functions, where a refactor's
    rename would only show when someone runs them: every `from palmrl... import name` must resolve."""
    import importlib

    missing = []
    for path in sorted((PACKAGE.parent / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("palmrl"):
                module = importlib.import_module(node.module)
                missing += [f"{path.name}:{node.lineno} {node.module}.{alias.name}" for alias in node.names
                            if not hasattr(module, alias.name)
                            and importlib.util.find_spec(f"{node.module}.{alias.name}") is None]
    assert missing == []
