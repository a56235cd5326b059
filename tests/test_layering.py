"""The top-level modules form layers: each imports only modules of lower layers, so no two import each other.

The imports are read from the source (ast), function-local ones included, since a lazy import is how a cycle
usually hides. README.md's "Layout" section shows the same order.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A new module goes into the lowest layer above everything it imports.
LAYERS: list[tuple[str, ...]] = [
    ("io_utils", "synthetic_tofu", "schema"),
    ("runtime", "layout"),
    ("metrics", "tofu"),
    ("models",),
    ("masks",),
    ("masking",),
    ("dataloader",),
    ("checkpoints",),
    ("checkpointer",),
    ("trainer", "evaluator"),
    ("mask_generator", "pretraining"),
    ("unlearn", "generate_mask", "eval_tofu", "aggregate"),
    ("sweep",),
]


def _modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(ROOT.glob("*.py"))}


def _local_imports(path: Path, local: set[str]) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    return (imported & local) - {path.stem}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _local_imports(path, set(modules)) for name, path in modules.items()}


def _layer_of() -> dict[str, int]:
    return {name: level for level, names in enumerate(LAYERS) for name in names}


def test_every_module_has_a_layer():
    layer_of, modules = _layer_of(), set(_modules())
    unknown = sorted(modules - set(layer_of))
    assert not unknown, "".join(f"\nadd {name} to LAYERS in tests/test_layering.py (and to README.md's Layout)"
                                for name in unknown)
    stale = sorted(set(layer_of) - modules)
    assert not stale, f"LAYERS in tests/test_layering.py names modules that do not exist: {stale}"


def test_no_import_cycle():
    graph = _graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_modules_import_only_lower_layers():
    layer_of = _layer_of()
    wrong = [f"{name} (layer {layer_of[name]}) imports {dep} (layer {layer_of[dep]})"
             for name, deps in sorted(_graph().items()) if name in layer_of
             for dep in sorted(deps) if dep in layer_of and layer_of[dep] >= layer_of[name]]
    assert not wrong, "imports that go sideways or up the layers of tests/test_layering.py:\n" + "\n".join(wrong)
