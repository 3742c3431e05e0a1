"""The package's shape, checked so it cannot drift: layers point one way, no import cycles, no class tests on
processes outside processes/, one sampler catalogue that every listing reads, papers cited rather than the seed
documents."""

import ast
import collections
import io
import pathlib
from contextlib import redirect_stdout

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src" / "diffusionlab"
MATHS = ("objectives", "likelihood", "metrics", "data", "noise", "processes", "gaussian", "schedules")
UPPER = ("samplers", "training", "models", "cli", "commands", "experiments", "oracles", "interop")
PROCESS_CLASSES = {"GaussianProcess", "GaussianChain", "VPChain", "VEChain", "LinearSDE", "VPSDE", "SubVPSDE",
                   "VESDE"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, ast.parse(path.read_text())


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "diffusionlab"


def _imports(tree):
    """Every ``diffusionlab`` module a tree imports, at any depth (lazy imports inside functions included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffusionlab"):
            yield node.module
            for alias in node.names:  # ``from diffusionlab import io`` imports the module diffusionlab.io
                if node.module == "diffusionlab":
                    yield f"diffusionlab.{alias.name}"
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("diffusionlab"))


def _graph():
    edges = collections.defaultdict(set)
    for name, _, tree in _modules():
        for target in _imports(tree):
            if _unit(target) != _unit(name):
                edges[_unit(name)].add(_unit(target))
    return edges


def test_maths_never_imports_samplers_training_models_or_the_cli():
    bad = []
    for name, path, tree in _modules():
        if _unit(name) in MATHS:
            bad += [f"{path.relative_to(ROOT)} imports {t}" for t in _imports(tree) if _unit(t) in UPPER]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_subpackages():
    """Tarjan's strongly connected components of the subpackage import graph (lazy imports included)."""
    edges = _graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_class_tests_on_processes_outside_processes():
    bad = []
    for name, path, tree in _modules():
        if _unit(name) == "processes":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                classes = node.args[1]
                names = [getattr(e, "id", getattr(e, "attr", None))
                         for e in (classes.elts if isinstance(classes, ast.Tuple) else [classes])]
                if PROCESS_CLASSES & set(names):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


def test_no_prediction_name_comparisons_outside_parametrization():
    """The parametrization is an object; nothing outside parametrization.py compares its name."""
    bad = []
    for name, path, tree in _modules():
        if name == "diffusionlab.parametrization":
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare) or getattr(node.left, "attr", None) != "prediction":
                continue
            literal = any(isinstance(c, (ast.Tuple, ast.List, ast.Set, ast.Constant)) for c in node.comparators)
            if any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops) or literal:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


def test_sources_cite_papers_not_the_seed_documents():
    words = ("seed 00", "seeds 00", "errata", "thesis")
    bad = [f"{p.relative_to(ROOT)}: {w}" for p in ROOT.rglob("*") if p.suffix in (".py", ".yaml")
           for w in words if w in p.read_text().lower()]
    assert not bad, bad


def _help(argv) -> str:
    from diffusionlab.cli import build_parser

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return "".join(out.getvalue().split())  # argparse wraps lines, also at hyphens


def test_every_listing_of_samplers_reads_the_one_catalogue():
    """``sample --help``, ``oracle sample --help``, ``evaluate --help``, the benchmark and the docs list the same
    names: the catalogue's."""
    from diffusionlab.oracles.bench import bench_samplers
    from diffusionlab.processes import VPSDE, VEChain
    from diffusionlab.samplers import sampler_names
    from diffusionlab.schedules import geometric_sigmas

    names = sampler_names()
    for argv in (["sample"], ["oracle", "sample"], ["evaluate"]):
        text = _help(argv)
        missing = [n for n in names if n not in text]
        assert not missing, (argv, missing)
    covered = set(bench_samplers(VPSDE())) | set(bench_samplers(VEChain(geometric_sigmas(10, 0.01, 1.0))))
    assert set(names) <= covered
    docs = (ROOT.parents[1] / "docs" / "samplers.md").read_text()
    assert not [n for n in names if f"`{n}`" not in docs]


def test_generated_reference_pages_are_current():
    """docs/config.md and the sampler table of docs/samplers.md are what the catalogues say now
    (regenerate with ``python -m diffusionlab.docs``)."""
    from diffusionlab.docs import pages

    stale = [str(p) for p, text in pages(ROOT.parents[1] / "docs").items() if not p.exists() or p.read_text() != text]
    assert not stale, f"out of date: {stale}; run python -m diffusionlab.docs"
