"""The library/application split: nothing in the library imports ``lightcrl.app`` (trainer, evaluation
orchestration, experiment grid, quickstart, search, report, CLI), not even inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "lightcrl"
APP = "lightcrl.app"
# The entry shim ``python -m lightcrl`` starts the CLI: it is the one library file allowed to.
SHELL = {"lightcrl.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, mod: str | None = None) -> list[tuple[int, str]]:
    """Every module a file imports, anywhere in it, with relative imports resolved (``mod``: its name)."""
    mod = mod or _module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            # ``from lightcrl import app`` imports the subpackage too
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names] + [(node.lineno, target)]
    return found


def core_modules() -> list[Path]:
    return [p for p in sorted(PKG.rglob("*.py"))
            if not _module_name(p).startswith(APP) and _module_name(p) not in SHELL]


def test_core_never_imports_the_application_layer():
    offenders = [
        f"{p.relative_to(PKG.parent)}:{line} imports {name}"
        for p in core_modules()
        for line, name in _imports(p)
        if name == APP or name.startswith(APP + ".")
    ]
    assert core_modules() and not offenders, "\n".join(offenders)


def test_the_import_walk_sees_function_level_and_relative_imports(tmp_path):
    """The check above would catch an offending import hidden in a function or written relatively."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..app import train\n    import lightcrl.app.evaluate\n")
    names = {n for _, n in _imports(probe, "lightcrl.metrics.probe")}
    assert {"lightcrl.app.train", "lightcrl.app.evaluate"} <= names


def test_importing_every_core_module_loads_no_application_module():
    names = [_module_name(p) for p in core_modules()]
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}:\n"
        "    importlib.import_module(n)\n"
        f"bad = sorted(m for m in sys.modules if m == {APP!r} or m.startswith({APP!r} + '.'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
