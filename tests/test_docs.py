"""The shipped documentation stays true: conf/atlas-milter.toml names every configuration
key with its default and is itself a valid configuration."""

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
