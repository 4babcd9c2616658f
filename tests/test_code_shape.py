"""The layout rules that keep the code easy to carry on (../shared/STYLE.md), checked on every
run: small files and functions, one name per idea, no module shadowing the standard library,
no private names borrowed across modules, services apart, and no import circles."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVING = ("services", "shared", "kernels", "conveyor")  # what `make run` runs
EVERYTHING = (*SERVING, "bench", "tools", "tests")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
ENTRY_NAMES = {"__init__", "__main__", "conftest"}


def python_files(roots: tuple[str, ...]) -> list[Path]:
    return sorted(p for root in roots if (REPO / root).is_dir() for p in (REPO / root).rglob("*.py"))


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def is_triton_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """@triton.jit (with or without arguments): kernels are written as one body on purpose."""
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def test_no_file_over_the_line_limit():
    long = [
        f"{p.relative_to(REPO)}: {n} lines"
        for p in python_files(EVERYTHING)
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not long, f"split by idea, each file under {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_the_line_limit():
    long = []
    for path in python_files(EVERYTHING):
        for node in ast.walk(parsed(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not is_triton_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"delegate, each function under {MAX_FUNCTION_LINES} lines: {long}"


def test_one_file_name_per_idea_in_the_serving_path():
    by_name = defaultdict(list)
    for path in python_files(SERVING):
        if path.stem not in ENTRY_NAMES:
            by_name[path.name].append(str(path.relative_to(REPO)))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, f"two modules, one name: rename each by what it holds: {clashes}"


def test_no_module_shadows_the_standard_library():
    shadows = [
        str(p.relative_to(REPO))
        for p in python_files(EVERYTHING)
        if p.stem in sys.stdlib_module_names and p.stem not in ENTRY_NAMES
    ]
    assert not shadows, (
        f"named like a standard-library module (a script run from its folder breaks): {shadows}"
    )


def test_no_private_name_imported_from_another_module():
    borrowed = []
    for path in python_files(EVERYTHING):
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in EVERYTHING:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        borrowed.append(f"{path.relative_to(REPO)}: from {node.module} import {alias.name}")
    assert not borrowed, f"make the name public where it belongs, or keep it to its module: {borrowed}"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, lazily inside functions included: a lazy import that
    only dodges a circle is still one."""
    me = module_name(path)
    package = me if path.stem == "__init__" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != me and not me.startswith(target + "."):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in python_files(SERVING)}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def test_no_service_imports_another_service():
    crossing = [
        f"{name} imports {dep}"
        for name, deps in import_graph().items()
        for dep in deps
        if name.startswith("services.")
        and dep.startswith("services.")
        and name.split(".")[1] != dep.split(".")[1]
    ]
    assert not crossing, f"services talk over sockets; what they share goes in shared/: {crossing}"


def test_no_import_circles():
    graph = import_graph()
    circles = []
    for start in sorted(graph):
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    circles.append(" -> ".join((*path, start)))
                elif dep not in seen and dep > start:  # each circle reported once, from its least module
                    seen.add(dep)
                    stack.append((dep, (*path, dep)))
    assert not circles, f"move what both need to where it belongs: {circles}"


def test_the_rules_catch_what_they_are_for(tmp_path):
    """The checks above read real code, so a clean tree proves little alone: each must flag a
    planted violation."""
    fn = ast.parse("@triton.jit\ndef k(X):\n    pass\n\ndef f():\n    pass\n").body
    assert is_triton_kernel(fn[0]) and not is_triton_kernel(fn[1])
    global REPO
    saved = REPO
    try:
        REPO = tmp_path
        (tmp_path / "services" / "a").mkdir(parents=True)
        (tmp_path / "services" / "b").mkdir(parents=True)
        (tmp_path / "services" / "a" / "x.py").write_text("from services.b.y import f\n")
        (tmp_path / "services" / "b" / "y.py").write_text("def f():\n    from services.a import x\n")
        graph = import_graph()
        assert graph == {"services.a.x": {"services.b.y"}, "services.b.y": {"services.a.x"}}
        for check in (test_no_service_imports_another_service, test_no_import_circles):
            try:
                check()
            except AssertionError:
                continue
            raise AssertionError(f"{check.__name__} missed a planted violation")
    finally:
        REPO = saved
