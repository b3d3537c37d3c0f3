"""The import graph of rf_megatron/ is the one docs/architecture.md §2 draws: every module in one layer, imports
only to its own layer or below (function-level imports included), no cycle. A new module is placed in a layer
here and in the doc."""
import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "rf_megatron"
LAYERS = {
    0: ("errors", "console", "value_residual_spec", "safe_checkpoint", "run_lock", "disk_space", "tokenizer", "indexed_data",
        "metrics", "run_summary", "launch", "ports", "quiet", "child_lifetime", "cpu_mode", "simulated_gpu",
        "device_peak", "lazy_jit", "scored_bytes", "plot_metrics", "__init__"),
    1: ("config", "run_config", "device", "vocab", "data", "flops", "checkpoint_dir", "checkpoint_health",
        "checkpointer", "signals", "single_process", "config_check", "v1_packing"),
    2: ("value_residual", "attention", "sdpa_attention", "layer", "layer_compile", "norm", "specs", "cross_entropy",
        "model", "schedule", "grads", "distopt_fixes", "step_kernels", "build", "checkpointing"),
    3: ("hf.",),
    4: ("training_loop", "resume", "engines", "engines.", "entry_point", "scaling.", "analysis", "analysis.", "cli."),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(module: str) -> int:
    for layer, names in LAYERS.items():
        if any(module == n or (n.endswith(".") and (module + ".").startswith(n)) for n in names):
            return layer
    raise AssertionError(f"rf_megatron.{module} is in no layer: add it to tests/test_layering.py and "
                         "docs/architecture.md §2")


def project_imports(path: Path, modules):
    """(imported module, line) for every import of our own modules in `path`, wherever it stands."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").startswith("rf_megatron"):
                target = node.module[len("rf_megatron."):] if node.module != "rf_megatron" else ""
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}".lstrip(".")
                yield (full if full in modules else target), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rf_megatron."):
                    yield alias.name[len("rf_megatron."):], node.lineno


@pytest.fixture(scope="module")
def graph():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {(t, line) for t, line in project_imports(p, files) if t in files and t != m}
            for m, p in files.items()}


def test_every_module_is_in_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own(graph):
    upward = [f"rf_megatron/{m.replace('.', '/')}.py:{line} imports {t} (layer {layer_of(t)} > {layer_of(m)})"
              for m, targets in sorted(graph.items()) for t, line in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle(graph):
    edges = {m: {t for t, _ in targets} for m, targets in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_method_and_the_error_type_import_nothing_of_ours(graph):
    assert not graph["value_residual_spec"] and not graph["errors"]
