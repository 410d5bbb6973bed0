"""The package is a map of the system (`../shared/notes/layout.md`): each folder is a layer or a
capability, and no module imports a layer above its own. Read from the source with `ast`, so lazy
imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "whisper_triton"
GROUND = {"errors", "settings", "assets"}  # every layer reads these; they import no layer
# what each folder may import besides itself and GROUND
ALLOWED: dict[str, set[str]] = {
    "contract": set(),
    "pipeline": {"contract"},
    "engines": {"pipeline", "contract"},
    "triton_models": {"engines", "speakers", "pipeline", "contract"},
    "http": {"registry", "live", "pipeline", "contract"},  # routes call their capability (live sessions, the model registry)
    "live": {"pipeline", "contract"},
    "speakers": {"pipeline", "contract"},
    "export": {"engines", "pipeline", "contract"},
    "deploy": {"contract"},
    "clients": {"pipeline", "contract"},
    "registry": {"export", "pipeline", "contract"},
    "bulk": {"clients", "deploy", "export", "pipeline", "contract"},
    "sagemaker_local": {"deploy", "clients", "pipeline", "contract", "http"},
    "supervisor": {"http", "export", "deploy", "registry", "engines", "triton_models", "pipeline", "contract"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level folders (or ground modules) of whisper_triton that `path` imports."""
    module = path.relative_to(PACKAGE).with_suffix("").parts
    package = list(module[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            if target:
                found.add(target[0])
            else:  # from . import x at the top of the package
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("whisper_triton."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("whisper_triton."))
    return found


def test_every_folder_is_a_known_layer_with_a_docstring():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders - {"assets"} <= set(ALLOWED), f"a new folder needs its place in ALLOWED: {folders - set(ALLOWED)}"
    for folder in folders - {"assets"}:
        tree = ast.parse((PACKAGE / folder / "__init__.py").read_text())
        assert ast.get_docstring(tree), f"{folder}/__init__.py must say what it owns and what it may import"


def test_no_module_sits_loose_at_the_top_but_the_ground_floor():
    loose = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert loose <= GROUND, f"modules belong in a layer folder: {sorted(loose - GROUND)}"


def test_no_import_runs_up_a_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).parts[0]
        own = {layer} | GROUND
        allowed = own | ALLOWED.get(layer, set()) if layer in ALLOWED else GROUND
        for target in imported_packages(path) - allowed:
            wrong.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule is not vacuous: a pipeline module importing http is caught."""
    fake = PACKAGE / "pipeline" / "_layer_probe.py"
    fake.write_text("from ..http import app\n")
    try:
        assert "http" in imported_packages(fake)
        assert "http" not in ALLOWED["pipeline"]
    finally:
        fake.unlink()
