"""The architecture rules of DESIGN.md, checked against the code's own imports (the team's archcheck, restated).

R1 runtime/ is what a device installs: nothing it imports (anywhere in runtime/, and at module level in the
   edgeq modules that pulls in, transitively) reaches passes/, targets/, importers/, models/ or a compile-time
   package.
R2 passes/ and targets/ never import each other; they meet in compile/.
R3 models/ families import the IR, errors, other families and numpy only (models/recipes/ is exempt).
R4 no import cycles between modules, imports inside functions included (a package __init__'s lazy facade
   functions excepted).
R5 a backend's facts live in its target and a format's in the registry: no comparison with a backend's name
   outside targets/, and ggml's block table is read by the registry (and the GGUF file reader) only.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPILE_TIME = {"torch", "transformers", "peft", "scipy", "onnx", "sklearn", "matplotlib", "tqdm", "xgboost",
                "lightgbm", "ray", "gguf"}
RUNTIME_FORBIDDEN = ("passes", "targets", "importers", "models")
BACKENDS = {"gguf", "onnx", "tvm"}


@dataclass(frozen=True)
class Edge:
    target: str
    line: int
    lazy: bool          # inside a function


def _package_map() -> dict[str, str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {pkg: folder for pkg, folder in cfg["tool"]["setuptools"]["package-dir"].items()}


def _modules() -> dict[str, Path]:
    by_folder = sorted(_package_map().items(), key=lambda kv: -len(kv[1]))
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        if rel.startswith((".", "tests/", "bench/", "fuzz/", "build/")) or "/." in rel:
            continue
        for pkg, folder in by_folder:
            if rel.startswith(folder.rstrip("/") + "/"):
                parts = rel[len(folder.rstrip("/")) + 1:-3].split("/")
                out[".".join([pkg] + (parts[:-1] if parts[-1] == "__init__" else parts))] = f
                break
    return out


def _edges(mod: str, path: Path, known: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(), str(path))
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    todo = [(tree, False)]
    while todo:
        node, lazy = todo.pop()
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        todo.extend((c, inner) for c in ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = node.module or ""
            if node.level:
                parent = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(parent + ([node.module] if node.module else []))
            names = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
        else:
            continue
        for n in names:
            parts = n.split(".")
            for k in range(len(parts), 0, -1):      # the longest known module, else the top-level package
                cand = ".".join(parts[:k])
                if cand in known or k == 1:
                    out.append(Edge(cand, node.lineno, lazy))
                    break
    return out


@pytest.fixture(scope="module")
def code():
    mods = _modules()
    return mods, {m: _edges(m, p, mods) for m, p in mods.items()}


def _folder(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def test_runtime_reaches_no_compiler_module_or_package(code):
    mods, edges = code
    seen = [m for m, p in mods.items() if _folder(p) == "runtime"]
    todo, bad = list(seen), []
    while todo:
        m = todo.pop()
        in_runtime = _folder(mods[m]) == "runtime"
        for e in edges[m]:
            if e.lazy and not in_runtime:
                continue                      # runs only if the runtime calls that function
            if e.target in mods:
                if _folder(mods[e.target]) in RUNTIME_FORBIDDEN:
                    bad.append(f"{m}:{e.line} -> {e.target}")
                elif e.target not in seen:
                    seen.append(e.target)
                    todo.append(e.target)
            elif e.target.split(".")[0] in COMPILE_TIME:
                bad.append(f"{m}:{e.line} -> {e.target}")
    assert not bad, bad


def test_passes_and_targets_never_import_each_other(code):
    mods, edges = code
    bad = [f"{m}:{e.line} -> {e.target}" for m, es in edges.items() for e in es
           if e.target in mods and {_folder(mods[m]), _folder(mods[e.target])} == {"passes", "targets"}]
    assert not bad, bad


def test_model_families_import_the_ir_and_numpy_only(code):
    mods, edges = code
    allowed = {"edgeq.core.ir", "edgeq.core.errors", "edgeq.core"}
    bad = []
    for m, es in edges.items():
        if _folder(mods[m]) != "models" or "/recipes/" in mods[m].as_posix():
            continue
        for e in es:
            ok = (e.target in mods and (_folder(mods[e.target]) == "models" or e.target in allowed)
                  or e.target.split(".")[0] in sys.stdlib_module_names or e.target.split(".")[0] == "numpy")
            if not ok:
                bad.append(f"{m}:{e.line} -> {e.target}")
    assert not bad, bad


def test_no_import_cycles(code):
    mods, edges = code
    graph = {m: {e.target for e in es if e.target in mods and e.target != m
                 and not (e.lazy and mods[m].name == "__init__.py")} for m, es in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def _backend_comparisons(path: Path) -> list[int]:
    """Lines comparing something named like a backend with a backend's name (`backend == "gguf"`)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        consts = {c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        named = any("backend" in ast.unparse(s) for s in sides if not isinstance(s, (ast.Constant, ast.Tuple)))
        if named and consts & BACKENDS:
            lines.append(node.lineno)
    return lines


def test_backends_are_dispatched_through_their_registries(code):
    mods, _ = code
    bad = []
    for m, p in mods.items():
        if _folder(p) == "targets":
            continue
        bad += [f"{m}:{line}" for line in _backend_comparisons(p)]
    assert not bad, bad


def test_ggml_block_sizes_are_read_by_the_format_registry_only(code):
    """(The GGUF reader also needs them, for every type a file may hold, including those edgeq never writes.)"""
    mods, _ = code
    bad = [m for m, p in mods.items() if "GGML_QUANT_SIZES" in p.read_text()
           and not m.startswith("edgeq.core.formats.") and m != "edgeq.importers.gguf_metadata"]
    assert not bad, bad


def test_the_rules_see_the_code(tmp_path):
    """The checks above are only as good as what they find: every package folder, a lazy import inside a
    function, a backend chain."""
    mods = _modules()
    assert {"edgeq.compile.pipeline", "edgeq.targets.base", "edgeq.passes.allocate", "edgeq.runtime",
            "edgeq.models.llama", "edgeq.models.recipes.synthetic"} <= set(mods)
    probe = tmp_path / "probe.py"
    probe.write_text("from edgeq.core import ir\n\ndef f(opts):\n    from edgeq.passes import allocate\n"
                     "    if opts.backend == 'gguf':\n        return 1\n    return opts.backend in ('onnx', 'tvm')\n")
    edges = _edges("edgeq.probe", probe, mods)
    assert Edge("edgeq.core.ir", 1, False) in edges and Edge("edgeq.passes.allocate", 4, True) in edges
    assert _backend_comparisons(probe) == [5, 7]


def test_team_archcheck_when_present():
    """The team's own checker (outside this repository) agrees, where this checkout has it."""
    tool = ROOT.parent / "shared" / "tools" / "archcheck.py"
    if not tool.is_file():
        pytest.skip("../shared/tools/archcheck.py is not beside this checkout")
    import subprocess

    r = subprocess.run([sys.executable, str(tool)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
