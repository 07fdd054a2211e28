"""Keeps the module layout honest: each third-party library has one home, front doors do
not import each other, and every CLI command is documented in the README."""

import ast
from pathlib import Path

from atlas_milter.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "atlas_milter"

HOMES = {
    "Milter": {f"adapters/milter/{f}" for f in ("handler.py", "replies.py", "libmilter.py", "loop.py")},  # the adapter package
    "imapclient": {"adapters/imap.py"},
    "sqlite_utils": {"store.py", "migrate.py"},
    "cachetools": {"cache.py"},
    "statsd": {"monitor.py"},
}
# The milter and the IMAP side (the listener and backfill, which shares its IMAP code)
# translate different protocols into the core and must not lean on each other.
SIDES = {
    "milter": {str(p.relative_to(PACKAGE)) for p in (PACKAGE / "adapters" / "milter").glob("*.py")},
    "imap": {"adapters/imap.py", "backfill.py"},
}
SIDE_MODULES = {"milter": {"atlas_milter.adapters.milter"}, "imap": {"atlas_milter.adapters.imap", "atlas_milter.backfill"}}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules():
    return {str(p.relative_to(PACKAGE)): imports_of(p) for p in PACKAGE.rglob("*.py")}


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
