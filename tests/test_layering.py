"""The dependency rule of docs/ARCHITECTURE.md ("Dependency rule"), enforced on every import.

Each ``tinytune`` package may import only the packages listed for it (imports inside functions
count too); recipes import no other recipe. Imports are read with ``ast``, nothing is executed.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALL = {
    "errors",
    "config",
    "device",
    "hub",
    "kernels",
    "tokenizers",
    "datasets",
    "modules",
    "models",
    "generation",
    "checkpoint",
    "distributed",
    "training",
    "cli",
}

#: package -> the tinytune packages it may import (besides itself); mirrors docs/ARCHITECTURE.md
_BELOW = {
    "errors": set(),  # tinytune/errors.py: TinytuneError and the run context; imports nothing of tinytune
    "config": set(),
    "device": {"config"},
    "hub": {"config"},  # Hugging Face Hub downloads (huggingface_hub imported inside, optional)
    "kernels": {"config"},
    "tokenizers": {"config"},
    "datasets": {"config", "tokenizers"},
    "modules": {"kernels", "config"},
    "models": {"modules", "kernels", "config"},
    "generation": {"models", "modules", "kernels", "config"},
    "checkpoint": {"models", "modules", "kernels", "tokenizers", "device", "config"},
    "distributed": {"checkpoint", "models", "modules", "kernels", "datasets", "tokenizers", "device", "config"},
    "training": ALL - {"training", "cli"},
    "cli": ALL - {"cli"},
}
ALLOWED = {pkg: below | ({"errors"} if pkg != "errors" else set()) for pkg, below in _BELOW.items()}


def _package(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT / "tinytune").with_suffix("").parts
    return parts[0]


def _imported_packages(tree: ast.AST, here: str) -> set[str]:
    """The tinytune packages an import statement names (``from tinytune import config`` -> config)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside this package
                continue
            mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names] if mod == "tinytune" else [mod]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tinytune" and len(parts) > 1 and parts[1] in ALL:
                found.add(parts[1])
    return found


def test_every_tinytune_package_imports_only_packages_below_it():
    violations = []
    for path in sorted((ROOT / "tinytune").rglob("*.py")):
        if path.parent == ROOT / "tinytune" and path.name == "__init__.py":
            continue
        here = _package(path)
        assert here in ALLOWED, f"{path}: package {here!r} is missing from the dependency table"
        for pkg in _imported_packages(ast.parse(path.read_text()), here) - {here}:
            if pkg not in ALLOWED[here]:
                violations.append(f"{path.relative_to(ROOT)} ({here}) imports tinytune.{pkg}")
    assert not violations, "\n".join(violations)


def test_the_table_is_acyclic():
    order: list[str] = []
    seen: set[str] = set()

    def visit(pkg: str, stack: tuple[str, ...]) -> None:
        assert pkg not in stack, f"cycle: {' -> '.join(stack + (pkg,))}"
        if pkg in seen:
            return
        for dep in ALLOWED[pkg]:
            visit(dep, stack + (pkg,))
        seen.add(pkg)
        order.append(pkg)

    for pkg in ALLOWED:
        visit(pkg, ())
    assert order[0] == "errors" and order[1] == "config"


def test_recipes_import_no_other_recipe():
    for path in sorted((ROOT / "recipes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not any(n == "recipes" or n.startswith("recipes.") for n in names), (path.name, names)


#: Module names that may repeat across packages (none today: the old clashes were renamed).
KNOWN_CLASHES: set[str] = set()


def test_no_two_modules_share_a_name_across_packages():
    seen: dict[str, pathlib.Path] = {}
    clashes = []
    for path in sorted((ROOT / "tinytune").rglob("*.py")):
        if path.name == "__init__.py" or path.name.startswith("_"):
            continue
        if path.stem in seen and path.stem not in KNOWN_CLASHES:
            clashes.append(f"{seen[path.stem].relative_to(ROOT)} and {path.relative_to(ROOT)}")
        seen[path.stem] = path
    assert not clashes, clashes
