"""The package's import graph: no circles, no upward imports, prep/ and data/ apart, configs without torch.

Every import counts, at module level or inside a function (a function-level import is how a circle
hides). Names a package exports lazily (its `_EXPORTS` table) resolve to the module that defines them.
The layering is the one DEVELOPERS.md draws; a module may import its own layer and the layers below.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first; the longest matching prefix places a module.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("caduceus_dist", "caduceus_dist.errors", "caduceus_dist.lazy", "caduceus_dist.fsio",
                    "caduceus_dist.native", "caduceus_dist.distributed")),
    ("model", ("caduceus_dist.model",)),
    ("shard format", ("caduceus_dist.shard_format",)),
    ("prep and data", ("caduceus_dist.prep", "caduceus_dist.data")),
    ("loss and optimizer", ("caduceus_dist.loss", "caduceus_dist.optim")),
    ("engine", ("caduceus_dist.engine",)),
    ("checkpoint and metrics", ("caduceus_dist.checkpoint", "caduceus_dist.metrics", "caduceus_dist.train.config")),
    ("job config", ("caduceus_dist.config",)),
    ("trainer", ("caduceus_dist.train",)),
    ("tools", ("caduceus_dist.export", "caduceus_dist.launch")),
    ("inference", ("caduceus_dist.inference",)),
    ("inference tools", ("caduceus_dist.embed", "caduceus_dist.score_variants")),
]
APART = [("caduceus_dist.prep", "caduceus_dist.data")]  # same layer, never importing each other
TORCH_FREE = ["caduceus_dist.config", "caduceus_dist.model.config", "caduceus_dist.data.config",
              "caduceus_dist.engine.config", "caduceus_dist.checkpoint.config", "caduceus_dist.optim.config",
              "caduceus_dist.metrics.config", "caduceus_dist.train.config", "caduceus_dist.prep.cli"]


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the package directory `root`."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _lazy_exports(path: Path) -> dict[str, str]:
    """A package `__init__`'s `_EXPORTS = {name: submodule}` table, if it has one."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body)."""
    modules = module_files(root)
    lazy = {name: _lazy_exports(path) for name, path in modules.items() if path.name == "__init__.py"}
    prefix = root.name

    def resolve(base: str, name: str | None) -> str | None:
        if name is not None and f"{base}.{name}" in modules:
            return f"{base}.{name}"
        if name is not None and name in lazy.get(base, {}):
            return f"{base}.{lazy[base][name]}"
        return base if base in modules else None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] == prefix}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == prefix:
                assert node.level == 0, f"{module}: relative import"
                edges |= {resolve(node.module, alias.name) for alias in node.names}
        graph[module] = {target for target in edges if target is not None and target != module}
    return graph


def layer_of(module: str, layers=LAYERS) -> int:
    """The layer of `module`; the root package name places only the root `__init__`, so a new module
    must be given a layer here rather than landing in the lowest one."""
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            within = "." in prefix and module.startswith(prefix + ".")
            if (module == prefix or within) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py"
    return rank


def upward_imports(graph: dict[str, set[str]], layers=LAYERS, apart=APART) -> list[str]:
    found = []
    for module, targets in graph.items():
        for target in sorted(targets):
            if layer_of(target, layers) > layer_of(module, layers):
                found.append(f"{module} ({layers[layer_of(module, layers)][0]}) imports {target} "
                             f"({layers[layer_of(target, layers)][0]})")
            for one, other in apart:
                for a, b in ((one, other), (other, one)):
                    if module.startswith(a + ".") and (target == b or target.startswith(b + ".")):
                        found.append(f"{module} imports {target}: {a} and {b} must not import each other")
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

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
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_import_circles_anywhere_in_the_package():
    assert circles(import_graph(REPO / "caduceus_dist")) == []


def test_no_layer_imports_a_higher_one_and_prep_and_data_stay_apart():
    assert upward_imports(import_graph(REPO / "caduceus_dist")) == []


def test_the_checks_catch_a_circle_an_upward_import_and_a_lazy_export(tmp_path):
    """The walker itself: a fabricated package with each defect must be reported."""
    pkg = tmp_path / "toy"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text('_EXPORTS = {"Thing": "impl"}\n')
    (pkg / "low" / "impl.py").write_text("def f():\n    from toy.high import g\n")  # function-level, upward
    (pkg / "high.py").write_text("from toy.low import Thing\n")  # resolves to toy.low.impl
    graph = import_graph(pkg)
    assert graph["toy.high"] == {"toy.low.impl"} and graph["toy.low.impl"] == {"toy.high"}
    assert circles(graph) == [["toy.high", "toy.low.impl"]]
    layers = [("low", ("toy", "toy.low")), ("high", ("toy.high",))]
    with pytest.raises(AssertionError, match=r"toy\.elsewhere is in no layer"):
        layer_of("toy.elsewhere", layers)
    assert upward_imports(graph, layers, apart=[]) == ["toy.low.impl (low) imports toy.high (high)"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_config_modules_and_the_sharder_import_no_torch(module):
    """A login node reads recipes (and shards genomes) without paying for torch."""
    code = (f"import sys, {module}\n"
            "from caduceus_dist.config import load_job_config\n"
            "from pathlib import Path\n"
            "for recipe in sorted(Path('recipes').glob('*.yaml')):\n"
            "    load_job_config(recipe)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed'))\n"
            "assert not heavy, heavy[:5]\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
