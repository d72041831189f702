"""The ES core is pure torch: importing it must not load transformers, trl, peft, accelerate or datasets."""

import ast
import pathlib
import subprocess
import sys

import trl_es.core


FORBIDDEN = ("transformers", "trl", "peft", "accelerate", "datasets")


def test_importing_core_loads_no_hf_library():
    code = (
        "import sys, trl_es.core\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"trl_es.core pulled in: {out.stdout.strip()}"


def test_core_sources_import_no_hf_library():
    for path in pathlib.Path(trl_es.core.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def _package_imports(path: pathlib.Path, package_root: pathlib.Path) -> set[str]:
    """Modules of trl_es that ``path`` imports, at the top level or inside a function (a lazy import can still
    hide a cycle)."""
    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
        package = module
    else:
        package = module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("trl_es"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("trl_es"))
    return found


def test_no_import_cycles_between_modules():
    """No module of trl_es imports, directly or through others, a module that imports it back (package
    ``__init__`` re-exports are left out: they import their own children by design)."""
    root = pathlib.Path(trl_es.core.__file__).parent.parent
    graph = {}
    for path in root.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        graph[name] = _package_imports(path, root)

    def visit(node, stack):
        if node in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(node) :] + [node])}")
        for target in graph.get(node, ()):
            visit(target, stack + [node])

    for node in graph:
        visit(node, [])
