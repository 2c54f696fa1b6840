"""The engine's layers, as the tree shows them (pscv/__init__.py has the table), and the size of its functions.

Layers, lowest first: `pscv` and `pscv.base` < `pscv.data` < `pscv.learn` < `pscv.jobs` < `pscv.cli`,
`pscv.slicer_inputs` (and `pscv.__main__`). A module imports only from its own layer and the layers below,
whether the import is at the top of the module or inside a function. `pscv.research` may import anything
but the command line, and only the command line imports it. The modules 3D Slicer's own process uses
import without torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "PSCVSegment" / "pscv"
SLICER_MODULE = ROOT / "PSCVSegment" / "PSCVSegment.py"

RANKS = {"base": 0, "data": 1, "learn": 2, "jobs": 3, "research": 4, "top": 5}
TOP = {"pscv.cli", "pscv.__main__", "pscv.slicer_inputs"}
# The modules 3D Slicer's own process imports: they never import torch, not even inside a function.
TORCH_FREE = ["pscv.jobs.folder", "pscv.jobs.staging", "pscv.jobs.processes", "pscv.jobs.client",
              "pscv.slicer_inputs", "pscv.learn.settings"]
TORCH_FREE_PACKAGES = ("pscv.base", "pscv.data")
MAX_FUNCTION_LINES = 80


def module_name(path: Path, root: Path = ENGINE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def engine_modules(root: Path = ENGINE) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def layer(module: str) -> str:
    """The layer of a module of the engine: base, data, learn, jobs, research or top."""
    if module in TOP:
        return "top"
    parts = module.split(".")
    if module == "pscv" or parts[1] == "base":
        return "base"
    if parts[1] in RANKS and parts[1] != "top":
        return parts[1]
    raise AssertionError(f"{module} belongs to no layer: put it in a subpackage of pscv or add it to the table")


def imported_modules(path: Path, module: str, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) of every pscv module that `path` imports, at its top or inside a function; relative
    imports resolved, `from package import module` counted as the module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.append((node.lineno, candidate if candidate in modules else target))
    return [(line, name) for line, name in found if name == "pscv" or name.startswith("pscv.")]


def violations(root: Path = ENGINE) -> list[str]:
    modules = engine_modules(root)
    problems = []
    for module, path in modules.items():
        source = layer(module)
        for line, target in imported_modules(path, module, modules):
            if target not in modules:
                problems.append(f"{path.name}:{line} imports {target}, which does not exist")
                continue
            destination = layer(target)
            where = f"{module_name(path, root)}:{line} ({source}) imports {target} ({destination})"
            if destination == "research" and module != "pscv.cli" and source != "research":
                problems.append(f"{where}: only the command line imports research code")
            elif target == "pscv.cli" and module != "pscv.__main__":
                problems.append(f"{where}: nothing imports the command line")
            elif destination == "top" and source != "top":
                problems.append(f"{where}: a lower layer imports an upper one")
            elif RANKS[destination] > RANKS[source]:
                problems.append(f"{where}: a lower layer imports an upper one")
    return problems


def test_every_module_belongs_to_a_layer():
    for module in engine_modules():
        layer(module)


def test_lower_layers_never_import_upper_ones():
    assert violations() == []


def test_the_check_finds_a_planted_violation(tmp_path):
    """The check itself: a copy of the engine with one upward import, inside a function, relative."""
    copy = tmp_path / "pscv"
    for path in engine_modules().values():
        target = copy / path.relative_to(ENGINE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    volumes = copy / "data" / "volumes.py"
    volumes.write_text(volumes.read_text() + "\n\ndef planted():\n    from ..learn import training\n")
    atomic = copy / "base" / "atomic.py"
    atomic.write_text(atomic.read_text() + "\n\nimport pscv.jobs.runner\n")
    found = violations(copy)
    assert len(found) == 2, found
    assert "pscv.data.volumes" in found[0] + found[1] and "pscv.learn.training" in found[0] + found[1]
    assert any("pscv.base.atomic" in f and "pscv.jobs.runner" in f for f in found)


def imports_torch(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        lines += [node.lineno for name in names if name == "torch" or name.startswith("torch.")]
    return lines


def test_what_slicer_imports_never_imports_torch():
    modules = engine_modules()
    checked = [m for m in modules if m.startswith(TORCH_FREE_PACKAGES)] + TORCH_FREE
    for module in checked:
        assert imports_torch(modules[module]) == [], f"{module} imports torch"
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in checked) + \
        "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "importing the modules Slicer uses loaded torch"


def long_functions(paths) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_no_function_is_longer_than_80_lines():
    assert long_functions([*sorted(ENGINE.rglob("*.py")), SLICER_MODULE]) == []


@pytest.mark.parametrize("module", sorted(engine_modules()))
def test_every_module_says_its_one_job_in_its_first_line(module):
    docstring = ast.get_docstring(ast.parse(engine_modules()[module].read_text()))
    assert docstring, f"{module} has no docstring"
    first = docstring.splitlines()[0]
    assert first.strip() and first.rstrip().endswith((".", ":")), f"{module}: {first!r}"
