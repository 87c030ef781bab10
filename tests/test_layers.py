"""The package's layering (docs/design.md, Layout): no import cycle among its files, ``import
dft_kernels`` loads neither the trainer nor transformers, and one default forward call crosses at
most seven of its files."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import dft_kernels as dk

ROOT = pathlib.Path(dk.__file__).parent
MAX_FILES_PER_CALL = 7


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: dict) -> str | None:
    """The package module ``name`` names (a file), or None for anything outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict:
    """module -> the package modules it imports, at module level or inside functions (a lazy
    import is still a dependency)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                dep = _resolve(target, files)
                if dep is not None and dep != name and dep != "dft_kernels":
                    deps.add(dep)
        graph[name] = deps
    return graph


def find_cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_the_package_files():
    cycles = find_cycles(import_graph())
    assert cycles == [], f"import cycles: {cycles}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_import_loads_neither_the_trainer_nor_transformers():
    code = ("import sys, dft_kernels; "
            "print([m for m in ('dft_kernels.train', 'dft_kernels.hf', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # and the lazy attributes still work
    assert dk.patch is dk.hf.patch and dk.train.__name__ == "dft_kernels.train"


def files_crossed(fn) -> list:
    """The package files whose functions run during ``fn()``, in call order (``sys.setprofile``)."""
    crossed = []

    def profile(frame, event, arg):
        if event == "call":
            path = frame.f_code.co_filename
            if path.startswith(str(ROOT)):
                rel = os.path.relpath(path, ROOT)
                if not crossed or crossed[-1] != rel:
                    crossed.append(rel)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return crossed


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_default_forward_call_crosses_at_most_seven_files(backend):
    if backend == "triton":
        from dft_kernels.backends import triton as tb

        if not tb._interpreting():
            pytest.skip("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (8,), generator=torch.Generator().manual_seed(0))
    call = lambda: dk.linear_cross_entropy(x, w, t, backend=backend)  # noqa: E731
    call()  # first-use imports and caches aside
    crossed = files_crossed(call)
    files = sorted(set(crossed))
    print(f"{backend}: {len(files)} files, {len(crossed) - 1} file-to-file hops: {files}")
    assert len(files) <= MAX_FILES_PER_CALL, files
