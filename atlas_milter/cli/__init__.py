"""The `atlas-milter` command: parses options, calls one library function per command,
prints. A user mistake (bad flag, bad config key, unreadable file, locked database) is one
`Error: …` line on stderr and a non-zero exit, never a traceback.

common.py (config, logging, stop), commands.py (mail, models, database), front_doors.py
(milter, idle, backfill), parser.py (the parser and `main`)."""

from atlas_milter.cli.common import Stopped
from atlas_milter.cli.front_doors import _performance_page
from atlas_milter.cli.parser import build_parser, main, version_line

__all__ = ["Stopped", "_performance_page", "build_parser", "main", "version_line"]
