"""The package's shape: no import cycle between its modules, and CuPy reached only through
backend.py (the one place that picks the array module)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinyuvit"


def _modules():
    """{dotted name: parsed source} of every module of the package."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (f, ast.parse(f.read_text(encoding="utf-8")))
    return out


def _imports(name, f, tree, known):
    """The package modules that module `name` imports anywhere in its code (relative imports)."""
    package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
            found |= {t for t in names if t in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tinyuvit"):
            found |= {node.module} & set(known)
    return found - {"tinyuvit"}        # the package's __init__ re-exports; it is not a module's dependency


def test_no_import_cycle():
    mods = _modules()
    graph = {name: _imports(name, f, tree, mods) for name, (f, tree) in mods.items()}
    done, path = set(), []

    def visit(m):
        assert m not in path, "import cycle: " + " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert "tinyuvit.config" in graph["tinyuvit.tools.checkpoint"]      # the edge that once closed a cycle


def test_only_backend_imports_cupy():
    users = []
    for name, (f, tree) in _modules().items():
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "cupy" or n.startswith("cupy.") for n in names):
                users.append(name)
    assert users == ["tinyuvit.backend"]
