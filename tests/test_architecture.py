"""Keeps the module layout honest: each third-party library has one home, front doors do
not import each other, and every CLI command is documented in the README."""

import ast
from pathlib import Path

from atlas_milter.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "atlas_milter"

HOMES = {
    "Milter": {"adapters/milter.py", "adapters/milter_loop.py"},  # the adapter and its protocol loop
    "imapclient": {"adapters/imap/connection.py", "adapters/imap/session.py", "adapters/imap/fetch.py",
                   "adapters/imap/listener.py"},
    "sqlite_utils": {"store.py", "migrate.py"},
    "cachetools": {"cache.py"},
    "statsd": {"monitor.py"},
}
# The milter and the IMAP side (the listener and backfill, which shares its IMAP code)
# translate different protocols into the core and must not lean on each other.
SIDES = {
    "milter": {"adapters/milter.py", "adapters/milter_loop.py"},
    "imap": {"adapters/imap/connection.py", "adapters/imap/session.py", "adapters/imap/fetch.py",
             "adapters/imap/actions.py", "adapters/imap/listener.py", "backfill.py"},
}
SIDE_MODULES = {"milter": {"atlas_milter.adapters.milter", "atlas_milter.adapters.milter_loop"}, "imap": {"atlas_milter.adapters.imap", "atlas_milter.adapters.imap.connection", "atlas_milter.adapters.imap.session", "atlas_milter.adapters.imap.fetch", "atlas_milter.adapters.imap.actions", "atlas_milter.adapters.imap.listener", "atlas_milter.backfill"}}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(root: Path = PACKAGE):
    return {str(p.relative_to(root)): imports_of(p) for p in root.rglob("*.py")}


def test_each_third_party_library_has_one_home():
    for module, names in modules().items():
        for library, homes in HOMES.items():
            if any(n == library or n.startswith(library + ".") for n in names):
                assert module in homes, f"{module} imports {library}; only {sorted(homes)} may"


def test_front_doors_do_not_import_each_other():
    found = modules()
    for side, files in SIDES.items():
        others = set().union(*(mods for s, mods in SIDE_MODULES.items() if s != side))
        for module in files:
            assert not (found.get(module, set()) & others), f"{module} imports the other front door"


def test_every_cli_command_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [c for c in commands if f"atlas-milter {c}" not in readme]
    assert not missing, f"README does not show: {missing}"


# The database is opened only where its schema and its one writer live (store.py), where
# every read outside the writer lives (queries.py) and by the migrator (migrate.py).
SQLITE_HOMES = {"store.py", "queries.py", "migrate.py"}


def sqlite_violations(found: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports sqlite3" for module, names in found.items()
                  if module not in SQLITE_HOMES and any(n == "sqlite3" or n.startswith("sqlite3.") for n in names))


def test_sqlite3_only_in_the_database_modules():
    assert sqlite_violations(modules()) == []


def test_the_sqlite3_rule_reports_a_deliberate_violation(tmp_path):
    package = tmp_path / "atlas_milter"
    (package / "adapters" / "imap").mkdir(parents=True)
    (package / "store.py").write_text("import sqlite3\n")
    (package / "queries.py").write_text("from sqlite3 import Connection\n")
    (package / "web.py").write_text("import json\n")
    (package / "adapters" / "imap" / "listener.py").write_text("import os\nimport sqlite3 as db\n")
    (package / "cli.py").write_text("def f():\n    from sqlite3 import connect\n")
    assert sqlite_violations(modules(package)) == [
        "adapters/imap/listener.py imports sqlite3",
        "cli.py imports sqlite3",
    ]
