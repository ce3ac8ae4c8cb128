"""The shape of the library's code, as README promises it: minihbt/ has no import cycle and no
import inside a function (imports are where a reader looks for them), no module over 350
lines and no function over 60; the programs (train.py, evaluate.py, study.py) import inside a
function only an optional dependency. Read with `ast`, so the check is exact, not a style hint."""
import ast
import os
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minihbt")
MODULES = sorted(os.path.relpath(os.path.join(d, f), PACKAGE)
                 for d, _, files in os.walk(PACKAGE) if "__pycache__" not in d for f in files if f.endswith(".py"))


def parse(rel):
    with open(os.path.join(PACKAGE, rel), encoding="utf-8") as f:
        src = f.read()
    return src, ast.parse(src)


def module_name(rel):
    return "minihbt." + rel[:-3].replace(os.sep, ".").removesuffix(".__init__")


def internal_imports(rel, tree):
    """The minihbt modules `rel` imports (relative imports resolved)."""
    package = module_name(rel).rsplit(".", 1)[0] if not rel.endswith("__init__.py") else module_name(rel)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("minihbt"))
    known = {module_name(m) for m in MODULES}
    return {m for m in found if m in known and m != module_name(rel)}


def test_no_import_cycle():
    graph = {module_name(rel): internal_imports(rel, parse(rel)[1]) for rel in MODULES}
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}   # a package's own __init__
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != "open", "import cycle: " + " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("rel", MODULES)
def test_module_and_function_sizes_and_no_imports_inside_functions(rel):
    src, tree = parse(rel)
    assert len(src.splitlines()) <= 350, f"{rel}: {len(src.splitlines())} lines"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno + 1 <= 60, f"{rel}:{node.lineno} {node.name}"
            inner = [n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not inner, f"{rel}: import inside {node.name} at line(s) {inner}"


ROOT = os.path.dirname(PACKAGE)
PROGRAMS = ("train.py", "evaluate.py", "study.py")
OPTIONAL = {"matplotlib", "matplotlib.pyplot"}          # a program works without them (evaluate.py's heatmap)


def inner_imports(tree):
    """The modules imported inside a function of `tree`."""
    return {a.name if isinstance(n, ast.Import) else n.module for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}


@pytest.mark.parametrize("program", PROGRAMS)
def test_programs_import_at_the_top_but_optional_dependencies(program):
    with open(os.path.join(ROOT, program), encoding="utf-8") as f:
        assert inner_imports(ast.parse(f.read())) <= OPTIONAL


def test_the_check_sees_a_cycle_and_an_inner_import():
    """The checks above can fail: they do on code that has the defects."""
    tree = ast.parse("def f():\n    import os\n")
    assert any(isinstance(n, ast.Import) for n in ast.walk(tree.body[0]))
    assert internal_imports("layers.py", ast.parse("from . import model\n")) == {"minihbt.model"}
    assert inner_imports(ast.parse("def f():\n    import matplotlib\n    from minihbt import data\n")) == {
        "matplotlib", "minihbt"}


# The plain path (the mathematics a learner reads, README "Read the code") and the speed
# machinery (each mechanism in one module): the first never imports the second.
PLAIN = ("layers.py", "encoder.py", "step.py", "dropout.py", "backend.py", "config.py")
SPEED = {"minihbt.parallel", "minihbt.length_groups", "minihbt.fast_step", "minihbt.data_parallel", "minihbt.rowgrad",
         "minihbt.packing", "minihbt.kernels"}


@pytest.mark.parametrize("rel", PLAIN)
def test_the_plain_path_imports_nothing_from_the_speed_modules(rel):
    assert not internal_imports(rel, parse(rel)[1]) & SPEED


def test_the_plain_path_is_three_files_of_at_most_about_900_lines():
    lines = sum(len(parse(rel)[0].splitlines()) for rel in ("layers.py", "encoder.py", "step.py"))
    assert lines <= 900, lines
    assert all(module_name(m) in {module_name(r) for r in MODULES} for m in PLAIN) and SPEED <= {module_name(r) for r in MODULES}


def test_the_speed_rule_sees_an_import():
    assert internal_imports("encoder.py", ast.parse("from . import parallel\n")) & SPEED == {"minihbt.parallel"}


@pytest.mark.parametrize("module", ["minihbt.layers", "minihbt.encoder", "minihbt.step"])
def test_the_plain_path_loads_alone(module):
    """In a fresh interpreter, importing a plain-path module (the package face with it) loads no
    speed module, no communicator, no progress bars and no BLAS thread control."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(PACKAGE)).stdout.split())
    assert module in loaded
    assert not loaded & (SPEED | {"minihbt.comm", "minihbt.model", "tqdm", "threadpoolctl"})
