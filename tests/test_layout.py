"""The layout rule: `<folder>/<sub>/<mod>.py` is `dstudio.<folder>.<sub>.<mod>`. The package list in pyproject.toml
names every folder with Python files (one it lacks imports in an editable install and is silently missing from the
wheel) and ships every asset as package data; imports point one way: nothing below the app imports dstudio.app,
and the modules of app/ import each other without a circle."""
import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("distill", "samplers", "search", "app", "configs")  # installed as dstudio.<folder>


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _module_name(path: Path) -> str:
    """The import name of a file or folder under the repository root, by the layout rule."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("dstudio", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "__pycache__" not in p.parts)


def _python_folders() -> set[Path]:
    """Every folder with Python files, except those inside an assets/ folder (package data: a shipped pipeline's
    remote code is a file of the asset, not a module of dstudio)."""
    return {p.parent for p in _sources(*FOLDERS) if "assets" not in p.relative_to(ROOT).parts}


def test_every_folder_with_python_files_is_a_listed_package():
    cfg = _setuptools()
    listed = set(cfg["packages"])
    expected = {_module_name(folder) for folder in _python_folders()} | {"dstudio.configs"}  # configs: YAML only
    assert not expected - listed, f"folders missing from pyproject's packages: {sorted(expected - listed)}"
    assert not listed - expected, f"packages with no folder: {sorted(listed - expected)}"
    for package in listed:  # each top-level folder is mapped to its import name, and only that
        top = ".".join(package.split(".")[:2])
        assert cfg["package-dir"][top] == top.split(".")[1], top
    assert set(cfg["package-dir"]) == {f"dstudio.{f}" for f in FOLDERS}


def test_every_asset_is_package_data():
    cfg = _setuptools()
    shipped = set()
    for package, patterns in cfg["package-data"].items():
        folder = ROOT / Path(*package.split(".")[1:])
        shipped |= {p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
    assets = {p for f in FOLDERS for a in (ROOT / f).rglob("assets") for p in a.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert assets and not assets - shipped, sorted(str(p.relative_to(ROOT)) for p in assets - shipped)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (`from a.b import c` gives a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_nothing_below_the_app_imports_it():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.startswith("dstudio.app"))
                 for p in _sources("distill", "samplers", "search", "configs")}
    assert not {k: v for k, v in offenders.items() if v}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    return next((c for n in sorted(graph) if n not in state for c in [visit(n, [n])] if c), None)


def test_no_import_circle_inside_the_app():
    modules = {_module_name(p): p for p in _sources("app")}
    graph = {name: (_imports(path) & set(modules)) - {name} for name, path in modules.items()}
    assert "dstudio.app.parser" in graph["dstudio.app.cli"]  # the graph sees the imports inside functions
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # and finds one where there is
