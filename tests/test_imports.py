"""The layers point one way: no two modules of ms_dfkd/ and kernels/ import each other, and kernels/
imports nothing of ms_dfkd/ (read from the source with ast, imports inside functions included)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules():
    mods = {}
    for pkg in ("ms_dfkd", "kernels"):
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = p
    return mods


def _imports(name, path, mods):
    """The project modules that module ``name`` imports."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        out.update(f for f in found if f in mods and f != name)
    return out


def test_no_two_modules_import_each_other():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert len(graph) > 30  # the walk found the project
    mutual = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, ())})
    assert mutual == []


def test_kernels_import_nothing_of_ms_dfkd():
    mods = _modules()
    up = [(m, i) for m, p in mods.items() if m.startswith("kernels") for i in _imports(m, p, mods)
          if i.startswith("ms_dfkd")]
    assert up == []
