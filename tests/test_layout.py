"""The package's shape: layers that only import downwards, no import cycle, training code that reaches simulators and
the Hub push through two narrow lazy hooks only, a train.py that stays readable, and a README that lists the tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from helpers import module_imports

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import its own layer or lower ones, never a higher one (lazy imports included).
LAYERS = [
    ("finetune._quiet", "finetune.logs", "finetune.entry", "finetune.lerobot_cli", "finetune.policies",
     "finetune.data"),
    ("finetune.config", "finetune.hub", "finetune.quant", "finetune.adapters", "finetune.envs"),
    ("finetune.training",),
    ("finetune.inference",),
    ("finetune.export",),
    ("finetune.train", "finetune.eval", "finetune.demo"),
]
# The only imports from training code to code above the loop: each inside the function that needs it.
LAZY_HOOKS = {("finetune.train", "finetune.envs.during_training"), ("finetune.train", "finetune.export.publish")}


def layer_of(module: str) -> int:
    if module == "finetune":
        return 0
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to README.md's Layout)")


def under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_no_module_imports_a_higher_layer():
    wrong = sorted(f"{source} -> {target}" for source, targets in module_imports(lazy=True).items()
                   for target in targets if layer_of(target) > layer_of(source))
    assert wrong == []


def test_policies_and_data_are_independent_of_each_other_and_of_training():
    graph = module_imports(lazy=True)
    for source, targets in graph.items():
        if under(source, "finetune.policies"):
            assert not {t for t in targets if under(t, "finetune.data", "finetune.training", "finetune.config")}, source
        if under(source, "finetune.data"):
            assert not {t for t in targets if under(t, "finetune.policies", "finetune.training")}, source


def test_training_code_imports_no_export_inference_simulator_or_demo_code():
    forbidden = ("finetune.export", "finetune.inference", "finetune.eval", "finetune.demo", "finetune.envs")
    lazy = module_imports(lazy=True)
    for source, targets in lazy.items():
        if under(source, "finetune.training"):
            assert not {t for t in targets if under(t, *forbidden)}, source
    eager = module_imports()["finetune.train"]
    assert not {t for t in eager if under(t, *forbidden)}
    hooks = {("finetune.train", t) for t in lazy["finetune.train"] if under(t, *forbidden)}
    assert hooks == LAZY_HOOKS


def test_the_package_has_no_import_cycle():
    graph = module_imports(lazy=True)  # even through the imports inside functions (merge <-> publish was one)
    state: dict[str, str] = {}  # depth-first search: "open" while on the current path, "done" after

    def find_cycle(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target):], target]
            if target not in state and (found := find_cycle(target, [*path, target])):
                return found
        state[node] = "done"
        return None

    for module in sorted(graph):
        cycle = find_cycle(module, [module]) if module not in state else None
        assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_train_py_stays_short_and_in_order():
    source = (ROOT / "finetune/train.py").read_text()
    assert len(source.splitlines()) < 550
    functions = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
    order = ["setup", "train_step", "fit", "report", "run", "main"]  # config -> setup -> fit -> save/report
    assert [f for f in functions if f in order] == order


@pytest.mark.parametrize("package", sorted(p.parent.name for p in (ROOT / "finetune").glob("*/__init__.py")))
def test_every_package_says_what_lives_there(package):
    docstring = ast.get_docstring(ast.parse((ROOT / "finetune" / package / "__init__.py").read_text()))
    assert docstring and len(docstring.split()) >= 8, package


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout"):]
    block = section[section.index("```") + 3 :]
    block = block[: block.index("```")]
    listed = set(re.findall(r"^(finetune/\S+\.py)\s", block, flags=re.M))
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "finetune").rglob("*.py")
               if p.name != "__init__.py" or p.parent.name in ("finetune", "training", "inference", "export", "data",
                                                                "envs", "policies")}
    assert sorted(modules - listed) == [] and sorted(listed - modules) == []
