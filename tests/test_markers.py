"""Every test module that starts a real tritonserver or `serve` says so with the `triton` marker,
so `pytest -m "not triton"` is a quick run that starts no server."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
STARTERS = {"start_serve", "TritonServer", "Supervisor"}  # calls that start a server
SERVER_FIXTURES = {"serve"}  # the session fixture that runs one


def starts_a_server(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in STARTERS:
                return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                arg.arg in SERVER_FIXTURES for arg in node.args.args):
            return True
    return False


def marked(source: str) -> bool:
    return "pytestmark = pytest.mark.triton" in source or "@pytest.mark.triton" in source


def test_server_starting_modules_carry_the_triton_marker():
    unmarked = [path.name for path in sorted(TESTS.glob("test_*.py"))
                if starts_a_server(ast.parse(path.read_text())) and not marked(path.read_text())]
    assert unmarked == []


def test_the_check_sees_a_server_start():
    assert starts_a_server(ast.parse("def test_x(serve):\n    pass\n"))
    assert starts_a_server(ast.parse("def f(tmp):\n    start_serve(tmp)\n"))
    assert not starts_a_server(ast.parse("def test_y(tmp_path):\n    pass\n"))
