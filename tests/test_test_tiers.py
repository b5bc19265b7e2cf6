"""The fast-tier lists in tests/conftest.py name tests that exist (a stale name would silently put a
heavy test back into `make test-fast`)."""

import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent


def _lists() -> dict[str, set[str]]:
    out = {}
    for node in ast.parse((TESTS / "conftest.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("HEAVY_MODULES", "HEAVY_TESTS"):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def test_heavy_modules_and_tests_exist():
    lists = _lists()
    assert set(lists) == {"HEAVY_MODULES", "HEAVY_TESTS"}
    for module in lists["HEAVY_MODULES"]:
        assert (TESTS / f"{module}.py").is_file(), module
    for entry in lists["HEAVY_TESTS"]:
        module, name = entry.split("::")
        assert module not in lists["HEAVY_MODULES"], f"{entry}: its whole module is heavy already"
        defined = {
            n.name for n in ast.parse((TESTS / f"{module}.py").read_text()).body if isinstance(n, ast.FunctionDef)
        }
        assert name in defined, f"{entry}: no such test function"
