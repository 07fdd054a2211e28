"""Keeps the module layout honest: each third-party library (and libmilter's C side) has
one home, front doors do not import each other, adapters hold no thresholds, and every
CLI command is documented in the README. The checks are functions over a source tree, so
a test can show each of them catching a deliberate violation."""

import ast
from pathlib import Path

from atlas_milter.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "atlas_milter"
MILTER_PACKAGE = {p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "adapters" / "milter").glob("*.py")}

HOMES = {
    "Milter": MILTER_PACKAGE,  # pymilter's Python side: the milter adapter package
    "milter": {"adapters/milter/libmilter.py"},  # libmilter's C side (pymilter's extension module)
    "ctypes": {"adapters/milter/libmilter.py"},  # mallopt and smfi_addheader with the GIL held
    "imapclient": {"adapters/imap/connection.py", "adapters/imap/session.py", "adapters/imap/fetch.py",
                   "adapters/imap/listener.py"},
    "sqlite_utils": {"store.py", "migrate.py"},
    "signal": {"signals.py"},  # one way of handling signals for every daemon and the CLI
    "cachetools": {"cache.py"},
    "statsd": {"monitor.py"},
    "redis": {"redis_link.py"},  # every Redis call behind the breaker and its short timeouts
    "psycopg": {"pg_ship.py", "shared_records.py"},
}
# The milter and the IMAP side (the listener and backfill, which shares its IMAP code)
# translate different protocols into the core and must not lean on each other.
SIDES = {
    "milter": lambda module: module.startswith("adapters/milter/"),
    "imap": lambda module: module.startswith("adapters/imap") or module == "backfill.py",
}
SIDE_MODULES = {"milter": ("atlas_milter.adapters.milter",), "imap": ("atlas_milter.adapters.imap", "atlas_milter.backfill")}

# Thresholds belong to the core (policy.py): an adapter may hand the scorer's cutoffs to the
# policy, but never imports what compares a score with them nor reads a cutoff's value.
THRESHOLD_NAMES = {"Cutoffs", "label_for", "resolve_cutoffs"}
THRESHOLD_ATTRIBUTES = {"spam_cutoff", "ham_cutoff"}
MAX_LINES = 600  # per module of the package (issue 16's bar)

# The database is opened only where its schema and its one writer live (store.py), where
# every read outside the writer lives (queries.py) and by the migrator (migrate.py).
SQLITE_HOMES = {"store.py", "journal.py", "queries.py", "migrate.py"}


def imports_of(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def parsed(root: Path) -> dict[str, ast.AST]:
    return {p.relative_to(root).as_posix(): ast.parse(p.read_text()) for p in sorted(root.rglob("*.py"))}


def home_violations(root: Path) -> list[str]:
    found = []
    for module, tree in parsed(root).items():
        for library, homes in HOMES.items():
            if any(n == library or n.startswith(library + ".") for n in imports_of(tree)) and module not in homes:
                found.append(f"{module} imports {library}; only {sorted(homes)} may")
    return found


def front_door_violations(root: Path) -> list[str]:
    found = []
    for module, tree in parsed(root).items():
        for side, belongs in SIDES.items():
            if not belongs(module):
                continue
            others = [m for s, mods in SIDE_MODULES.items() if s != side for m in mods]
            for name in imports_of(tree):
                if any(name == m or name.startswith(m + ".") for m in others):
                    found.append(f"{module} ({side}) imports {name}, the other front door")
    return found


def threshold_violations(root: Path) -> list[str]:
    found = []
    for module, tree in parsed(root).items():
        if not module.startswith("adapters/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "atlas_milter.policy":
                found += [f"{module}:{node.lineno} imports {a.name}" for a in node.names if a.name in THRESHOLD_NAMES]
            elif isinstance(node, ast.Attribute) and (
                node.attr in THRESHOLD_ATTRIBUTES
                or (node.attr in ("spam", "ham") and isinstance(node.value, ast.Attribute) and node.value.attr == "cutoffs")
            ):
                found.append(f"{module}:{node.lineno} reads a threshold (.{node.attr})")
    return found


def size_violations(root: Path) -> list[str]:
    return [f"{p.relative_to(root).as_posix()}: {n} lines" for p in sorted(root.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES]


def sqlite_violations(root: Path) -> list[str]:
    return sorted(f"{module} imports sqlite3" for module, tree in parsed(root).items()
                  if module not in SQLITE_HOMES and any(n == "sqlite3" or n.startswith("sqlite3.") for n in imports_of(tree)))


def test_each_library_has_one_home():
    assert home_violations(PACKAGE) == []


def test_front_doors_do_not_import_each_other():
    assert front_door_violations(PACKAGE) == []


def test_adapters_hold_no_thresholds():
    assert threshold_violations(PACKAGE) == []


def test_modules_stay_small():
    assert size_violations(PACKAGE) == []


def test_sqlite3_only_in_the_database_modules():
    assert sqlite_violations(PACKAGE) == []


def test_the_checks_catch_deliberate_violations(tmp_path):
    def write(rel: str, text: str) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write("adapters/milter/handler.py", "import ctypes\nimport milter\nfrom atlas_milter.adapters.imap import x\n")
    write("adapters/milter/libmilter.py", "import ctypes\nimport milter\n")  # the one allowed place
    write("pool.py", "import Milter\n")
    write("adapters/imap/session.py", "from atlas_milter.adapters.milter.replies import REPLIES\n")
    write("adapters/milter/engine.py", "from atlas_milter.policy import Cutoffs, MessagePolicy\n"
                                       "x = model.spam_cutoff\ny = scorer.cutoffs.ham\nz = MessagePolicy(mc, scorer.cutoffs)\n")
    write("adapters/milter/runtime.py", "\n" * (MAX_LINES + 1))

    assert sorted(home_violations(tmp_path)) == [
        "adapters/milter/handler.py imports ctypes; only ['adapters/milter/libmilter.py'] may",
        "adapters/milter/handler.py imports milter; only ['adapters/milter/libmilter.py'] may",
        f"pool.py imports Milter; only {sorted(MILTER_PACKAGE)} may",
    ]
    assert sorted(front_door_violations(tmp_path)) == [
        "adapters/imap/session.py (imap) imports atlas_milter.adapters.milter.replies, the other front door",
        "adapters/milter/handler.py (milter) imports atlas_milter.adapters.imap, the other front door",
    ]
    assert threshold_violations(tmp_path) == [
        "adapters/milter/engine.py:1 imports Cutoffs",
        "adapters/milter/engine.py:2 reads a threshold (.spam_cutoff)",
        "adapters/milter/engine.py:3 reads a threshold (.ham)",
    ]
    assert size_violations(tmp_path) == [f"adapters/milter/runtime.py: {MAX_LINES + 1} lines"]
    write("store.py", "import sqlite3\n")
    write("queries.py", "from sqlite3 import Connection\n")
    write("adapters/imap/listener.py", "import os\nimport sqlite3 as db\n")
    write("cli.py", "def f():\n    from sqlite3 import connect\n")
    assert sqlite_violations(tmp_path) == ["adapters/imap/listener.py imports sqlite3", "cli.py imports sqlite3"]


def test_every_cli_command_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [c for c in commands if f"atlas-milter {c}" not in readme]
    assert not missing, f"README does not show: {missing}"


def path_edits(files: list[Path]) -> list[str]:
    """Calls that change sys.path (`sys.path.insert(...)`, `.append`, ...) in these files."""
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "path"
                    and isinstance(node.func.value.value, ast.Name) and node.func.value.value.id == "sys"):
                found.append(f"{path.name}:{node.lineno} sys.path.{node.func.attr}")
    return found


def test_tests_and_scripts_import_by_package_name():
    """Shared test code lives in tests/support and is imported as tests.support.<module>; no
    file edits sys.path to reach it, and every test_*.py module holds tests."""
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    assert path_edits(files) == []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        names = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert any(n.startswith("test_") for n in names), f"{path.name} holds no tests: move it to tests/support/"


def test_the_sys_path_check_catches_an_edit(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text('import sys\nsys.path.insert(0, "tests")\ncode = "sys.path.append(1)"\n')
    assert path_edits([script]) == ["bench.py:2 sys.path.insert"]
