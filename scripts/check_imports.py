"""The package's import rules, checked from source (no import runs): every `saisa` import, at module level or inside a
function, must point at a lower layer than the importing module's, or inside its own part; and no chain of imports may
come back to where it started (a cycle works only by import order, and breaks when someone reorders).
`python scripts/check_imports.py` prints each violation and exits 1 on any.

Layers, lowest first; parts on one line are siblings and may not import each other:
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS = [
    ("compat", "portable"),  # transformers' moving APIs; the files every saved folder carries
    ("components",),  # decoder backbones, vision encoders, connectors: one file each
    ("processing",),  # text + images -> model inputs
    ("model",),  # config, the visual K/V equation, the forward, the KV caches
    ("checkpoints",),  # the one loader, the one pairing of a model with its processor, every conversion
    ("embedded",),  # the embedded default: real assets assembled by `checkpoints`
    ("__init__",),  # `import saisa`: the public names
    ("inference",),  # generation, stop rules, the step decoder, scoring
    ("serving", "training", "evaluation"),
    ("bench",),  # FLOPs and timings
    ("integrations", "experiments"),  # vLLM, lmms-eval; demo and reproduce
    ("cli",),  # each verb parses its flags and calls one function
]
LAYER_OF = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
__doc__ += "\n".join("    " + " | ".join(parts) for parts in LAYERS) + "\n"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The layer part a module belongs to: the first name under `saisa` (`saisa` itself: "__init__")."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported saisa module) for every import in the file, relative ones resolved; `from a import b` names
    module a.b when that is a module, else a. Imports under `if TYPE_CHECKING:` are left out: they never run."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {  # `if TYPE_CHECKING:` imports never run
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
        for statement in node.body
        for inner in ast.walk(statement)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else base))
    return [(line, name) for line, name in found if name == "saisa" or name.startswith("saisa.")]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules of each import cycle: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def check(root: Path) -> list[str]:
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    known = set(files)
    problems, graph = [], {}
    for module, path in files.items():
        part = part_of(module)
        if part not in LAYER_OF:
            problems.append(f"{path}: part `{part}` is in no layer (add it to LAYERS in {Path(__file__).name})")
            continue
        graph[module] = set()
        for line, target in imports_of(path, module, known):
            graph[module].add(target)
            target_part = part_of(target)
            if target_part == part:
                continue
            if target_part not in LAYER_OF:
                problems.append(f"{path}:{line}: imports {target}, which is in no layer")
            elif LAYER_OF[target_part] >= LAYER_OF[part]:
                where = "a higher layer" if LAYER_OF[target_part] > LAYER_OF[part] else "a sibling part"
                problems.append(f"{path}:{line}: `{part}` imports {target} from {where} (`{target_part}`)")
    problems += ["import cycle among: " + ", ".join(cycle) for cycle in import_cycles(graph)]
    return list(dict.fromkeys(problems))


def main() -> int:
    problems = check(Path(__file__).resolve().parents[1] / "saisa")
    print("\n".join(problems) or "imports: no cycles, no upward or sibling imports")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
