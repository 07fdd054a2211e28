"""The shipped documentation stays true: conf/atlas-milter.toml names every configuration
key with its default and is itself a valid configuration; the README's Install section shows
the commands tests/test_install.py runs, and the current --version line; the pages in docs/ are
linked from the README, their links resolve, and every command, script and flag they show exists."""

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


DOCS = README.parent / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]


def sh_lines(page: Path) -> list[str]:
    """The command lines of a page's sh blocks: continuation lines joined, comments and
    option brackets (`[--json]`) stripped."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line.replace("[", " ").replace("]", " "))
    return lines


def test_every_docs_page_is_linked_from_the_readme():
    readme = README.read_text()
    assert len(PAGES) > 1, "docs/ has no pages"
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: link to {target}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
                assert anchor in {_slug(h) for h in headings}, f"{page.name}: link to {target}: no such heading"


def test_documented_commands_and_flags_exist():
    """Every `atlas-milter COMMAND --flag` shown in the README and docs/ is one the CLI takes."""
    from atlas_milter.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    shown = 0
    for page in PAGES:
        for line in sh_lines(page):
            words = line.split()
            if words[0] != "atlas-milter":
                continue
            shown += 1
            sub = commands.get(words[1]) if not words[1].startswith("-") else parser
            assert sub is not None, f"{page.name}: `{line}`: no command {words[1]}"
            known = set(sub._option_string_actions)
            for word in words[2:]:
                flag = word.split("=", 1)[0]
                if flag.startswith("--"):
                    assert flag in known, f"{page.name}: `{line}`: {words[1]} takes no {flag}"
    assert shown >= 20


def test_documented_scripts_exist_and_take_their_flags():
    """Every `python -m scripts.NAME --flag` shown exists, runs from the repository as shown
    (`--help`), and takes the flags shown."""
    import subprocess
    import sys

    helps: dict[str, str] = {}
    for page in PAGES:
        for line in sh_lines(page):
            words = line.split()
            if words[:2] != ["python", "-m"] or not words[2].startswith("scripts."):
                assert not (words[:1] == ["python"] and "scripts/" in line), f"{page.name}: `{line}`: run scripts as python -m scripts.NAME"
                continue
            script = README.parent / "scripts" / (words[2].split(".", 1)[1] + ".py")
            assert script.is_file(), f"{page.name}: `{line}`: no {script.name}"
            if words[2] not in helps:
                proc = subprocess.run([sys.executable, "-m", words[2], "--help"], capture_output=True, text=True,
                                      timeout=60, cwd=README.parent)
                assert proc.returncode == 0, f"{words[2]} --help: {proc.stderr[-300:]}"
                helps[words[2]] = proc.stdout
            for word in words[3:]:
                flag = word.split("=", 1)[0]
                if flag.startswith("--"):
                    assert re.search(rf"{re.escape(flag)}\b", helps[words[2]]), f"{page.name}: `{line}`: no {flag}"
    assert len(helps) >= 4, "scripts shown in the docs: " + ", ".join(helps)


def test_readme_python_api_example_runs(tmp_path):
    """The README's Python API example, run as a script from another directory, does what its
    comments say: a verdict, a streamed folder, a pool, the cache, two verdict rows."""
    import sqlite3
    import subprocess
    import sys

    [code] = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (tmp_path / "example.py").write_text(code)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    verdict, streamed, pooled, cached, timed = proc.stdout.splitlines()
    assert verdict.startswith("spam ")
    assert re.fullmatch(r"\d+ processed, \d+ skipped in 3 chunks", streamed)
    assert pooled == "[1, 2, 3]" and cached == "cached result" and timed == "1"
    with sqlite3.connect(tmp_path / "verdicts.db") as db:
        assert sorted(db.execute("SELECT source, verdict FROM processed_emails")) == [("script", "ham"), ("script", "spam")]


def test_files_the_docs_name_exist():
    """A path in backticks (`atlas_milter/...`, `adapters/...`, `scripts/...`, `conf/...`,
    `systemd/...`, `tests/...`, `migrations/...`) names a file or folder of this repository."""
    roots = ("atlas_milter/", "adapters/", "scripts/", "conf/", "systemd/", "tests/", "migrations/")
    named = 0
    for page in PAGES:
        for path in re.findall(r"`([\w./-]+)`", page.read_text()):
            if not path.startswith(roots) or "*" in path:
                continue
            named += 1
            candidates = [README.parent / path, README.parent / "atlas_milter" / path]
            assert any(c.exists() for c in candidates), f"{page.name} names {path}: no such file"
    assert named >= 10
