"""Layering and size rules of the code base, checked statically (AST imports, line counts).

* ``sa_theory`` imports nothing of ours; ``toy_problems`` imports only ``sa_theory``; ``t2i`` imports only
  ``sa_theory`` (never ``digits`` or ``toy_problems``); ``digits`` may import ``t2i`` and ``sa_theory``.
* No library file is over 400 lines.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("sa_theory", "toy_problems", "t2i", "digits", "figures")
ALLOWED = {
    "sa_theory": set(),
    "toy_problems": {"sa_theory"},
    "t2i": {"sa_theory"},
    "digits": {"sa_theory", "t2i"},
}
MAX_LINES = 400


def _files(pkg):
    return sorted((ROOT / pkg).rglob("*.py"))


def _imported_packages(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & set(PACKAGES)


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_lower_layers_never_import_higher_ones(pkg):
    bad = {str(f.relative_to(ROOT)): sorted(_imported_packages(f) - ALLOWED[pkg] - {pkg}) for f in _files(pkg)}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"layering violated (allowed for {pkg}: {sorted(ALLOWED[pkg])}): {bad}"


def test_the_import_checker_sees_a_violation(tmp_path):
    """Negative control: the checker flags an import of a higher layer, also inside a function."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import digits.rewards\n    from t2i.rewards import make_reward\n")
    assert _imported_packages(f) == {"digits", "t2i"}


@pytest.mark.parametrize("pkg", ["sa_theory", "toy_problems", "t2i", "digits"])
def test_no_library_file_over_400_lines(pkg):
    long = {str(f.relative_to(ROOT)): n for f in _files(pkg) if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
