"""The shipped documentation stays true: conf/atlas-milter.toml names every configuration
key with its default and is itself a valid configuration; the README's Install section shows
the commands tests/test_install.py runs, and the current --version line."""

import dataclasses
import re
import tomllib
from pathlib import Path

from atlas_milter.config import Config, load_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "atlas-milter.toml"


def test_annotated_config_is_valid_and_equals_the_defaults():
    assert load_config(CONF, env={}) == Config()


def test_annotated_config_names_every_key():
    text = CONF.read_text()
    data = tomllib.loads(text)
    defaults = Config()
    for field in dataclasses.fields(Config):
        value = getattr(defaults, field.name)
        if not dataclasses.is_dataclass(value):
            assert field.name in data, f"{field.name} missing from {CONF.name}"
            continue
        for sub in dataclasses.fields(type(value)):
            default = getattr(value, sub.name)
            if isinstance(default, dict):  # tables of rules/accounts: shown as commented examples
                assert re.search(rf"^# \[{field.name}\.{sub.name}\.", text, re.M), f"[{field.name}.{sub.name}.*] example missing"
            else:
                assert sub.name in data.get(field.name, {}), f"[{field.name}] {sub.name} missing from {CONF.name}"


README = Path(__file__).resolve().parents[1] / "README.md"


def install_commands() -> set[str]:
    """The commands in the sh blocks of the README's Install section (comments stripped)."""
    section = README.read_text().split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    lines = "\n".join(re.findall(r"```sh\n(.*?)```", section, re.S)).splitlines()
    return {line.split("  #", 1)[0].strip() for line in lines if line.strip() and not line.startswith("#")}


def test_readme_install_shows_the_commands_tests_test_install_runs():
    commands = install_commands()
    # tests/test_install.py: make install / make uninstall (server), pipx install . (one user),
    # pip install of the release into a fresh venv.
    assert {"make install", "make uninstall", "pipx install .", "python3 -m venv ~/atlas && ~/atlas/bin/pip install ."} <= commands
    assert "pip install ." not in commands  # into Debian's own Python: PEP 668 refuses it


def test_readme_version_line_is_the_current_one():
    from atlas_milter.cli import version_line

    [example] = [c for c in install_commands() if c.startswith("atlas-milter --version")]
    shown = README.read_text().split(example, 1)[1].split("\n", 1)[0].strip().lstrip("#").strip()
    assert shown == version_line()
