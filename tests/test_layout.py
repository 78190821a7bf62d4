"""The package layout: one folder per pipeline stage, arrows only downward, no import cycle, docs that match.

Imports are read with `ast` (every `import` statement, those inside functions too: a lazy import is
still a dependency), so the test needs no import-linter configuration and no package import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "medcot"

# Lowest first. A module may import its own stage and the stages below it, never one above.
# Stages on the same rung (serve, export) stay independent of each other.
LAYERS = [
    {"medcot", "medcot.errors", "medcot.io", "medcot.disclaimer", "medcot.config", "medcot.embedded"},
    {"medcot.data"},
    {"medcot.model"},
    {"medcot.generate"},
    {"medcot.train"},
    {"medcot.eval"},
    {"medcot.rl"},  # GRPO: its reward is eval's extractor, its data passes eval's overlap check
    {"medcot.serve", "medcot.export"},
    {"medcot.doctor"},
    {"medcot.cli"},
    {"medcot.__main__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str:
    """The layer entry a module belongs to: its stage package, or itself for top-level modules."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _rung(module: str) -> int:
    stage = _stage(module)
    for i, layer in enumerate(LAYERS):
        if stage in layer:
            return i
    raise AssertionError(f"{module}: its stage {stage} is in no layer of tests/test_layout.py; add it")


def _imports(path: Path) -> set[str]:
    """The medcot modules `path` imports (absolute names; `from x import y` counts y when y is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "medcot"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "medcot":
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                is_module = (REPO / Path(*sub.split("."))).with_suffix(".py").is_file() or (REPO / Path(*sub.split("."))).is_dir()
                found.add(sub if is_module else mod)
    found.discard(me)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_points_down_or_within_its_stage(graph):
    upward = []
    for src, deps in graph.items():
        for dst in deps:
            if _stage(src) == _stage(dst):
                continue
            if _rung(dst) > _rung(src) or (_rung(dst) == _rung(src) and _stage(dst) != _stage(src) and _rung(src) > 0):
                upward.append(f"{src} -> {dst}")
    assert not upward, "imports that point up (or sideways) the pipeline:\n" + "\n".join(sorted(upward))


def test_no_import_cycle(graph):
    """Tarjan's strongly connected components over module imports: every component is one module."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue  # a package's __init__ counted under its own name, or a name from `import medcot.x as y`
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

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    """The rules above can fail: an upward arrow and a two-module cycle are both caught."""
    fake = {"medcot.data.rows": {"medcot.train.trainer"}, "medcot.train.trainer": {"medcot.data.rows"}}
    assert _rung("medcot.train.trainer") > _rung("medcot.data.rows")
    with pytest.raises(AssertionError, match="point up"):
        test_every_import_points_down_or_within_its_stage(fake)
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycle(fake)


def test_every_stage_is_a_folder_and_no_module_lies_loose():
    loose = {p.stem for p in PACKAGE.glob("*.py")}
    assert loose == {"__init__", "__main__", "cli", "config", "disclaimer", "doctor", "embedded", "errors", "io"}
    for stage in ("data", "model", "generate", "train", "eval", "rl", "serve", "export"):
        assert (PACKAGE / stage / "__init__.py").is_file(), stage


def test_every_module_the_readme_names_exists():
    """README's architecture list names real files, and names every stage folder."""
    text = (REPO / "README.md").read_text()
    named = set(re.findall(r"\b(medcot/[\w/]+(?:\.py|/))", text))
    assert named, "README names no module"
    missing = [n for n in sorted(named) if not (REPO / n).exists()]
    assert not missing, f"README names modules that do not exist: {missing}"
    for stage in ("data", "model", "generate", "train", "eval", "rl", "serve", "export"):
        assert f"medcot/{stage}/" in named, f"README's architecture list misses medcot/{stage}/"


def test_docs_name_only_files_that_exist():
    """Paths in docs/*.md that point into the repository (medcot/, bench/, configs/, docs/) exist."""
    missing = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "bench").glob("*.md"))]:
        for ref in re.findall(r"`((?:medcot|bench|configs|docs|scripts)/[\w./-]+)`", doc.read_text()):
            ref = ref.rstrip(".")
            if "<" in ref or "*" in ref:
                continue
            if not (REPO / ref).exists():
                missing.append(f"{doc.relative_to(REPO)}: {ref}")
    assert not missing, "docs point at files that do not exist:\n" + "\n".join(missing)
