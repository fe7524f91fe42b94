"""The llm package stands alone: `fedlearn` builds on it, never the reverse (docs/decisions.md,
issue 14), so the model service can be imported, used and tested without the round code."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import hearthnet.llm

LLM_DIR = Path(hearthnet.llm.__file__).parent


def package_of(path: Path) -> str:
    """The dotted package a source file under `hearthnet/llm` belongs to."""
    return ".".join(["hearthnet", "llm", *path.relative_to(LLM_DIR).parts[:-1]])


def imported_modules(source: str, package: str) -> set[str]:
    """Every module `source` names in an import statement, at any depth (lazy imports too),
    relative ones resolved against `package`; `from a import b` yields `a` and `a.b`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{module}" if module else base
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def is_fedlearn(module: str) -> bool:
    return module.split(".")[:2] == ["hearthnet", "fedlearn"]


def test_the_walk_finds_every_spelling_of_a_fedlearn_import():
    """Without this the check below could pass by missing a form of import."""
    spellings = [
        "import hearthnet.fedlearn.lora",
        "from hearthnet import fedlearn",
        "def f():\n    from hearthnet.fedlearn.manifest import RoundManifest",
        "from ..fedlearn import delta",
        "from ...fedlearn.x import y",
    ]
    for source in spellings:
        package = "hearthnet.llm.sub" if "..." in source else "hearthnet.llm"
        assert any(map(is_fedlearn, imported_modules(source, package))), source
    assert not any(map(is_fedlearn, imported_modules("from . import model", "hearthnet.llm")))
    assert not any(map(is_fedlearn, imported_modules("import hearthnet.fedlearning", "x")))


def test_no_llm_module_imports_fedlearn():
    sources = sorted(LLM_DIR.rglob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "service.py", "model.py"}
    offenders = {
        str(p.relative_to(LLM_DIR)): sorted(
            filter(is_fedlearn, imported_modules(p.read_text(encoding="utf-8"), package_of(p)))
        )
        for p in sources
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_llm_module_loads_no_fedlearn_module():
    """The same at run time, in a fresh interpreter: nothing pulls fedlearn in indirectly."""
    modules = sorted(
        package_of(p) + ("" if p.name == "__init__.py" else "." + p.stem)
        for p in LLM_DIR.rglob("*.py")
    )
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('hearthnet.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert set(modules) <= set(loaded)
    assert [m for m in loaded if is_fedlearn(m)] == []
