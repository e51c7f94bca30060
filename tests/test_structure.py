"""The package's structure holds: no import cycles between its parts, and one owner of the export
format (the names ANEMLL's runtimes look up are spelled in one source file only)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "anemll_mlx"


def unit_of(module: str) -> str:
    """The part a module belongs to: its subpackage (``export``, ``runtime``...) or, for a
    top-level module, the module itself (``format``, ``output``, ``cli``...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every anemll_mlx module ``path`` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("anemll_mlx")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("anemll_mlx"):
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import format`
    return found


def part_graph() -> dict[str, set[str]]:
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        here = unit_of(module_name(path))
        for target in imported_modules(path):
            if target in modules or any(m.startswith(target + ".") for m in modules):
                there = unit_of(target)
                if there not in (here, "__init__"):
                    graph[here].add(there)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_parts_of_the_package_import_each_other_without_cycles():
    graph = part_graph()
    assert graph["models"] >= {"ops"} and "models" not in graph["ops"]  # the vocabulary sits below the models
    assert "runtime" not in graph["export"]  # export writes the format, it does not read exports back
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


# --- one owner of the export format


def code_strings(path: Path) -> set[str]:
    """String constants of a source file (f-string pieces included), docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


STATE_NAMES = ("model.model.kv_cache_0", "model_model_kv_cache_0", "kv_cache_local", "kv_cache_global")
FILE_STEMS = ("_FFN_PF", "_chunk_", "_embeddings", "_lm_head")  # the pieces of {prefix}_FFN_PF..._chunk_NNofMM
# (the keys "embeddings", "ffn" and "lm_head" are also the parts' one name across CLI, library and
# meta.yaml by design, so they are not format-only words)
META_KEYS = (
    "model_info", "context_length", "batch_size", "num_chunks", "model_prefix", "split_lm_head", "lm_head_chunk_sizes", "argmax_in_model", "sliding_window", "recommended_sampling",
    "prefill_dynamic_slice",
    "lut_", "_per_channel", "kv_state", "kv_states", "chunk_layers", "source_sha256", "attention_chunk",
)  # fmt: skip
PROGRAM_NAMES = (
    "infer", "prefill", "_rotate", "input_ids", "hidden_states", "position_ids", "causal_mask", "current_pos",
    "output_hidden_states", "argmax_idx", "argmax_val",
)  # fmt: skip
# GGUF headers use two of the same words for their own keys ({arch}.context_length,
# {arch}.attention.sliding_window); the GGUF reader spells those, not meta.yaml's.
ELSEWHERE = {"context_length": {"loading/gguf.py"}, "sliding_window": {"loading/gguf.py"}}


def test_one_source_file_spells_the_export_format():
    owners: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        strings = code_strings(path)
        for name in (*STATE_NAMES, *FILE_STEMS, *META_KEYS, *PROGRAM_NAMES):
            exact = name in strings
            state_name = name in STATE_NAMES and any(name in s for s in strings)
            if exact or state_name:
                owners[name].add(str(path.relative_to(PACKAGE)))
    for name, files in owners.items():
        assert files - ELSEWHERE.get(name, set()) == {"format.py"}, f"'{name}' is spelled in {sorted(files)}"
    assert set(owners) == {*STATE_NAMES, *FILE_STEMS, *META_KEYS, *PROGRAM_NAMES}  # and format.py spells them all
