"""The architecture rules of issue 10, checked statically over the import graph of the packages.

Every ``.py`` under ``data_specs/``, ``models/`` and ``pipeline/`` is parsed with :mod:`ast` (nothing is
imported). Imports inside functions count like top-level ones: a lazy import is a dependency all the same.
Imports under ``if TYPE_CHECKING:`` count for the layering rules but not for cycles (they never run).
Each rule is one test whose failure message lists every offender as ``path:line``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_specs", "models", "pipeline")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
FLWR_ALLOWED = {f"pipeline.federated.{m}" for m in ("client_app", "server_app", "embedded", "secure_sum_app")}
MODELS_FORBIDDEN = (
    "pipeline",
    "lightning",
    "pytorch_lightning",
    "flwr",
    "h5py",
    "openslide",
    "pandas",
    # file I/O
    "pathlib",
    "os",
    "io",
    "shutil",
    "pickle",
    "json",
    "yaml",
    "tifffile",
    "anndata",
    "scanpy",
    "safetensors",
)
# calls that change global state when run at import (attribute or function name)
SIDE_EFFECT_CALLS = {
    "setLevel",
    "basicConfig",
    "addHandler",
    "disable",
    "filterwarnings",
    "simplefilter",
    "captureWarnings",
    "use",
    "manual_seed",
    "seed",
    "set_float32_matmul_precision",
    "set_num_threads",
    "set_start_method",
    "putenv",
    "setdefault",
    "chdir",
}


@dataclass(frozen=True)
class Import:
    """One import statement's target: ``module`` (resolved, absolute), the names taken from it, where."""

    src: str  # importing module
    module: str
    names: tuple[str, ...]
    line: int
    type_checking: bool

    def where(self) -> str:
        return f"{module_path(self.src)}:{self.line}"


@cache
def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the checked packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def module_path(name: str) -> str:
    return str(modules()[name].relative_to(ROOT))


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(encoding="utf-8"), filename=str(modules()[name]))


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _absolute(src: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = modules()[src].name == "__init__.py"
    base = src.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports(src: str) -> tuple[Import, ...]:
    """Every import in module ``src``, at any depth."""
    found: list[Import] = []

    def visit(node: ast.AST, tc: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(src, a.name, (), node.lineno, tc) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append(Import(src, _absolute(src, node), tuple(a.name for a in node.names), node.lineno, tc))
        for child in ast.iter_child_nodes(node):
            visit(child, tc or (isinstance(node, ast.If) and _is_type_checking(node) and child in node.body))

    visit(tree(src), False)
    return tuple(found)


def targets(imp: Import) -> set[str]:
    """The checked modules an import loads (``from pkg import sub`` loads the module ``pkg.sub``)."""
    mods = modules()
    out = set()
    if imp.module in mods:
        out.add(imp.module)
    for n in imp.names:
        if f"{imp.module}.{n}" in mods:
            out.add(f"{imp.module}.{n}")
    return out


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def offenders(pred) -> list[str]:
    """``path:line imports X`` for every import for which ``pred(import)`` is true."""
    return sorted(
        f"{imp.where()} imports {imp.module}" + (f" ({', '.join(imp.names)})" if imp.names else "")
        for src in modules()
        for imp in imports(src)
        if pred(imp)
    )


def fail_if(bad: list[str], rule: str) -> None:
    if bad:
        pytest.fail(f"{rule} ({len(bad)}):\n  " + "\n  ".join(bad), pytrace=False)


# ---------------------------------------------------------------- the import graph


def test_no_import_cycle():
    graph = {m: set() for m in modules()}
    for m in modules():
        for imp in imports(m):
            if not imp.type_checking:
                graph[m] |= targets(imp) - {m}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    bad = [" <-> ".join(c) for c in cycles]
    fail_if(bad, "import cycles (modules importing each other, directly or through others)")


def test_only_the_cli_imports_stages_and_cli():
    """The CLI, and the cross-validation orchestrator (its folds train through ``stage_train``), import the stages;
    nothing imports the CLI."""

    def bad(imp: Import) -> bool:
        hit = (targets(imp) | {imp.module}) & {"pipeline.stages", "pipeline.cli"}
        allowed = imp.src == "pipeline.cli" or (imp.src == "pipeline.crossval" and hit == {"pipeline.stages"})
        return bool(hit) and within(imp.src, "pipeline") and not allowed

    fail_if(offenders(bad), "only pipeline/cli.py (and pipeline/crossval.py, the stages) may import pipeline.stages")


def test_training_and_federated_do_not_import_outputs():
    def bad(imp: Import) -> bool:
        src_ok = within(imp.src, "pipeline.training") or within(imp.src, "pipeline.federated")
        return src_ok and within(imp.module, "pipeline.outputs")

    fail_if(offenders(bad), "pipeline.training and pipeline.federated must not import pipeline.outputs")


def test_stats_imports_no_training_federated_or_outputs():
    parts = ("pipeline.training", "pipeline.federated", "pipeline.outputs")

    def bad(imp: Import) -> bool:
        return within(imp.src, "pipeline.stats") and any(within(imp.module, p) for p in parts)

    fail_if(offenders(bad), "pipeline.stats must not import training, federated or outputs")


def test_data_specs_import_no_pipeline_or_models():
    def bad(imp: Import) -> bool:
        return within(imp.src, "data_specs") and any(within(imp.module, p) for p in ("pipeline", "models"))

    fail_if(offenders(bad), "data_specs/ (the contracts) must not import pipeline or models")


# The encoder factory takes a local weights file (as timm's create_model does): it may name a path, nothing more.
MODELS_ALLOWED = {("models.encoders", "pathlib")}


def test_models_are_pure_torch():
    def bad(imp: Import) -> bool:
        if (imp.src, imp.module) in MODELS_ALLOWED:
            return False
        return within(imp.src, "models") and any(within(imp.module, f) for f in MODELS_FORBIDDEN)

    fail_if(offenders(bad), f"models/ must not import {', '.join(MODELS_FORBIDDEN)}")


def test_only_the_flower_apps_import_flwr():
    def bad(imp: Import) -> bool:
        return within(imp.module, "flwr") and imp.src not in FLWR_ALLOWED

    fail_if(offenders(bad), f"only {', '.join(sorted(FLWR_ALLOWED))} may import flwr")


def _private(n: str) -> bool:
    return n.startswith("_") and not (n.startswith("__") and n.endswith("__"))


def imports_private(imp: Import) -> bool:
    """True when ``imp`` takes a private name (``_x``: a function, class or module) from another checked module."""
    internal = any(within(imp.module, p) for p in PACKAGES)
    names = [*imp.module.split(".")[1:], *imp.names]
    return internal and imp.module != imp.src and any(_private(n) for n in names)


def test_no_private_name_imported_across_modules():
    rule = "private names (_x) imported from another module: make them public or move them"
    fail_if(offenders(imports_private), rule)


def test_the_private_name_rule_can_fail():
    def imp(module: str, *names: str) -> Import:
        return Import("pipeline.stages", module, names, 1, False)

    assert imports_private(imp("pipeline.outputs.baselines", "_raw_block"))
    assert imports_private(imp("pipeline.outputs", "_helpers"))
    assert imports_private(imp("pipeline.outputs._helpers", "helper"))
    assert imports_private(imp("pipeline._helpers"))
    assert not imports_private(imp("pipeline.outputs.baselines", "fit_baselines", "__all__"))
    assert not imports_private(imp("numpy", "_globals"))  # outside the checked packages
    assert not imports_private(Import("pipeline.stages", "pipeline.stages", ("_x",), 1, False))


# ---------------------------------------------------------------- sizes


def test_modules_are_short():
    bad = []
    for m, f in modules().items():
        n = len(f.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            bad.append(f"{module_path(m)}: {n} lines")
    fail_if(sorted(bad), f"modules over {MAX_MODULE_LINES} lines")


def test_functions_are_short():
    bad = []
    for m in modules():
        for node in ast.walk(tree(m)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    bad.append(f"{module_path(m)}:{node.lineno} {node.name}: {n} lines")
    fail_if(sorted(bad), f"functions over {MAX_FUNCTION_LINES} lines")


# ---------------------------------------------------------------- import-time side effects


def _calls(node: ast.AST) -> list[str]:
    """Names of the calls in ``node`` that change global state (see ``SIDE_EFFECT_CALLS``)."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in SIDE_EFFECT_CALLS:
                out.append(name)
    return out


def _top_level_problems(body: list[ast.stmt]) -> list[tuple[int, str]]:
    """``(line, what)`` for each top-level statement that does something when the module is imported."""
    bad: list[tuple[int, str]] = []
    for i, st in enumerate(body):
        if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str):
            if i == 0:
                continue  # the docstring
            bad.append((st.lineno, "a bare string statement"))
        elif isinstance(st, ast.Import | ast.ImportFrom):
            continue
        elif isinstance(st, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bad += [(st.lineno, f"decorator calls {c}()") for d in st.decorator_list for c in _calls(d)]
        elif isinstance(st, ast.Assign | ast.AnnAssign):
            tgts = st.targets if isinstance(st, ast.Assign) else [st.target]
            flat = [e for t in tgts for e in (t.elts if isinstance(t, ast.Tuple | ast.List) else [t])]
            if not all(isinstance(t, ast.Name) for t in flat):
                bad.append((st.lineno, "assigns into another object (attribute or item)"))
            bad += [(st.lineno, f"calls {c}()") for c in _calls(st)]
        elif isinstance(st, ast.If) and _is_type_checking(st):
            bad += _top_level_problems([ast.Pass(), *st.orelse])  # its else branch runs at import
        elif isinstance(st, ast.If) and "__name__" in ast.unparse(st.test) and "__main__" in ast.unparse(st.test):
            continue
        elif isinstance(st, ast.Try):
            for part in (st.body, st.orelse, st.finalbody, *[h.body for h in st.handlers]):
                bad += _top_level_problems([ast.Pass(), *part])  # no docstring allowance
        elif isinstance(st, ast.Pass):
            continue
        else:
            bad.append((st.lineno, f"runs a {type(st).__name__} statement: {ast.unparse(st)[:60]}"))
    return bad


def test_no_side_effects_at_import():
    bad = [f"{module_path(m)}:{line} {what}" for m in modules() for line, what in _top_level_problems(tree(m).body)]
    fail_if(sorted(bad), "module-level code with side effects at import (move it into a function)")


@pytest.mark.parametrize(
    "source",
    [
        "import logging\nlogging.getLogger('x').setLevel(10)",
        "import warnings\nwarnings.filterwarnings('ignore')",
        "import matplotlib\nmatplotlib.use('Agg')",
        "import os\nos.environ['X'] = '1'",
        "import os\n_ = os.environ.setdefault('X', '1')",
        "import torch\ntorch.manual_seed(0)",
        "import sys\nsys.path, x = [], 1",
        "'doc'\n'a second string'",
        "try:\n    import scanpy\nexcept ImportError:\n    import warnings\n    warnings.simplefilter('ignore')",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import numpy\nelse:\n    print('at import')",
        "for i in range(3):\n    pass",
        "from functools import cache\nimport logging\n@cache\n@logging.disable(10)\ndef f():\n    pass",
    ],
)
def test_the_side_effect_rule_catches(source):
    assert _top_level_problems(ast.parse(source).body), source


def test_the_side_effect_rule_allows_definitions():
    source = (
        "'doc'\nfrom __future__ import annotations\nimport logging\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import numpy\nlog = logging.getLogger(__name__)\nA, B = 1, 2\nX: int = 3\n"
        "def f():\n    logging.basicConfig()\nclass C:\n    pass\nif __name__ == '__main__':\n    f()"
    )
    assert _top_level_problems(ast.parse(source).body) == []
