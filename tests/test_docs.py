"""The repository documents itself: every ``*.md`` a file names exists in the repository,
and the core keeps the layering docs/architecture.md describes (no Ray, no outer layer, no
import cycles). Static checks: nothing is imported or run."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "build", "work", "node_modules", "__pycache__", ".pytest_cache"}
SCANNED = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".html", ".txt", ".cfg"}
SCANNED_NAMES = {"Makefile", "Dockerfile"}
# a path-like token ending in .md: letters, digits, _ - . / and no scheme or spaces
MD_PATH = re.compile(r"(?<![\w/.:-])((?:\.\./|\./)?[\w.-]+(?:/[\w.-]+)*\.md)\b")
OUTER_LAYERS = ("ray", "pipelines", "training", "serving", "infra", "tests", "bench")
# .md files the code writes (outputs, not documentation): never in the repository
GENERATED = {
    "report.md",  # unclip demo
    "eval.md",  # unclip eval
    "notes.md",  # a stray non-image file in the ETL tests' input folders
}


def tree_files() -> list[Path]:
    """The repository's text files (the venv, caches and run outputs pruned, not walked)."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            p = Path(folder) / name
            if p.suffix in SCANNED or name in SCANNED_NAMES:
                out.append(p)
    return out


def resolves(name: str, where: Path, basenames: frozenset[str] = frozenset()) -> bool:
    """A named .md resolves relative to the naming file or from the repository root; a
    bare file name (``ROOT / "docs" / "own-data.md"`` in code) by its name in the tree."""
    name = name.split("#", 1)[0]
    if "/" not in name and name in basenames:
        return True
    candidates = [where.parent / name, ROOT / name]
    return any(c.resolve().is_file() and ROOT in c.resolve().parents for c in candidates)


def test_every_md_file_named_in_the_tree_exists() -> None:
    missing = []
    named = 0
    files = tree_files()
    basenames = frozenset(f.name for f in files if f.suffix == ".md")
    for f in files:
        text = f.read_text(errors="replace")
        for m in MD_PATH.finditer(text):
            name = m.group(1)
            named += 1
            if name in GENERATED:
                continue
            if not resolves(name, f, basenames):
                line = text.count("\n", 0, m.start()) + 1
                missing.append(f"{f.relative_to(ROOT)}:{line}: {name}")
    assert named > 20  # the scan finds the references it is meant to check
    assert not missing, "names of files that are not in the repository:\n" + "\n".join(missing)


def test_markdown_links_point_into_the_repository() -> None:
    """Relative links ``[text](path)`` in the Markdown files open a file of the tree."""
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for f in tree_files():
        if f.suffix != ".md":
            continue
        for m in link.finditer(f.read_text()):
            target = m.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (f.parent / target).resolve().exists():
                broken.append(f"{f.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (absolute imports)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def core_modules() -> dict[str, Path]:
    mods = {}
    for p in (ROOT / "unclip").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def test_the_core_imports_neither_ray_nor_an_outer_layer() -> None:
    bad = []
    for name, path in core_modules().items():
        for imp in imports_of(path):
            top = imp.split(".")[0]
            if top in OUTER_LAYERS:
                bad.append(f"{name} imports {imp}")
    assert not bad, "\n".join(sorted(bad))


def test_core_modules_import_each_other_without_cycles() -> None:
    mods = core_modules()
    graph = {
        name: {i for i in imports_of(path) if i in mods and i != name}
        for name, path in mods.items()
    }
    # a package's __init__ re-exporting its submodules is not a cycle through them
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle.extend(path[path.index(dep) :] + [dep] if dep in path else [node, dep])
                return True
            if dep not in state and visit(dep, [*path, dep]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if start not in state and visit(start, [start]):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_md_scan_catches_a_missing_name() -> None:
    """The pattern finds the kinds of references the tree uses (and only those)."""
    gone = "NOT_IN_THE_TREE" + ".md"  # spelled apart so that this file passes the scan
    text = (
        f'see {gone}, "x"; docs/formats.md#errors-table; (../serving/README.md) '
        "https://example.com/x.md not-a-path.mdx"
    )
    assert [m.group(1) for m in MD_PATH.finditer(text)] == [
        gone,
        "docs/formats.md",
        "../serving/README.md",
    ]
    assert not resolves(gone, ROOT / "README.md")
    assert resolves("docs/formats.md#errors-table", ROOT / "unclip" / "schema.py")
    assert resolves("../serving/README.md", ROOT / "docs" / "own-data.md")
