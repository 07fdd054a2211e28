"""The package as users get it, not as this checkout runs it (README, Install).

A release is built once per run from a clean copy of the checkout (the files git tracks or
would track: no .venv, build/ or *.egg-info) with `python -m build`: the sdist, then the wheel
from the sdist. Then:

- the wheel holds every file of the package directory, every package file the commands open
  at run time in the checkout (an audit hook records them) is in it, and the sdist holds the
  whole source tree;
- the wheel and the sdist, each pip-installed into a fresh venv and run from an unrelated
  directory: --version, demo (the checkout's 12 verdicts), classify --json, migrate and
  check-config on the shipped example config;
- `pipx install .` as an unprivileged user: --version and classify;
- the server install: `make install` in the unpacked sdist (scripts/install.sh, Debian's
  /usr/bin/python3) below a scratch root R. The installed milter is started with the unit's
  own ExecStartPre and ExecStart lines, as the unit's User/Group (setpriv), in its
  WorkingDirectory, with its UMask, its KillSignal and a $NOTIFY_SOCKET to wait for READY=1,
  as systemd would (no systemd runs here); mail goes through a private Postfix configured
  with the shipped conf/postfix-main.cf and arrives with the verdict headers. A second
  install keeps an edited config byte for byte and the database; uninstall keeps both,
  --purge removes them.

What the server test substitutes in the unit's command lines, and why:
  /usr/local/bin/atlas-milter  ->  R/usr/local/bin/atlas-milter  (the link the install made in R)
  /var/spool/postfix           ->  the private Postfix's queue_directory (the shipped snippet's
                                   smtpd_milters = unix:atlas-milter/milter.sock is relative to it)
  WorkingDirectory /var/lib/atlas-milter  ->  R/var/lib/atlas-milter
The milter itself reads /etc/atlas-milter/atlas-milter.toml when that exists on this machine
(not R's copy, which check-config reads as the service user instead). The system user
atlas-milter is real; the test deletes it afterwards when it did not exist before.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from atlas_milter import __version__, migrate
from atlas_milter.classifier import load_model
from tests.support.requirements import _unavailable, require_binary, require_root, start_or_fail
from tests.support.servers import REPO_ROOT
from tests.support.servers import PostfixInstance
from tests.support.smtp import header, new_token, send_one, with_token
from tests.test_systemd import unit_settings

pytestmark = pytest.mark.integration

SAMPLE_HAM = "01-team-meeting.eml"
SAMPLE_SPAM = "08-pharmacy.eml"
ALL_MIGRATIONS = ("0001_initial, 0002_add_performance_indexes, 0003_imap_lookups, 0004_imap_accounts, "
                  "0005_history_lookups, 0006_decision_cutoffs, 0007_quarantine_actions, 0008_decision_stages, "
                  "0009_cluster_outbox, 0010_ship_marks")
SERVICE_USER = "atlas-milter"
VERDICT_LINE = re.compile(r"^(SPAM|HAM|UNSURE) +\d\.\d{3}  ")


@dataclass(frozen=True)
class Release:
    src: Path  # the clean copy both were built from
    sdist: Path
    wheel: Path


def user_env(**extra: str | Path) -> dict[str, str]:
    """This environment (proxies, pip settings) without anything that points Python at the
    checkout: no PYTHONPATH, no active venv, no PATH entry inside the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                  if p and not Path(p).resolve().is_relative_to(REPO_ROOT))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(argv: list, *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run to completion; any exit but 0 fails the test with the command's output."""
    argv = [str(a) for a in argv]
    proc = subprocess.run(argv, cwd=cwd, env=env if env is not None else user_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{shlex.join(argv)} (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def checkout_files(dest: Path) -> None:
    """Copy the checkout as a fresh clone would hold it, with uncommitted edits: git's tracked
    and untracked-but-not-ignored files (symlinks stay symlinks)."""
    if not (REPO_ROOT / ".git").exists() or not shutil.which("git"):
        pytest.fail(f"{REPO_ROOT} is not a git checkout (or git is missing): the packaging tests build from one", pytrace=False)
    names = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        source = REPO_ROOT / name
        if os.path.lexists(source):  # a file deleted but not yet committed is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name, follow_symlinks=False)


def files_below(top: Path) -> set[str]:
    """Relative paths of the regular files below `top`, through symlinked directories."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        found.update(str(Path(dirpath, f).relative_to(top)) for f in filenames)
    return found


@pytest.fixture(scope="module")
def scratch():
    """A 0755 directory under /tmp, outside the checkout (other users must traverse it)."""
    path = Path(tempfile.mkdtemp(prefix="atlas-install-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def release(scratch: Path) -> Release:
    src = scratch / "src"
    checkout_files(src)
    dist = scratch / "dist"
    run([sys.executable, "-m", "build", "--outdir", dist, src], cwd=scratch)
    [sdist], [wheel] = list(dist.glob("*.tar.gz")), list(dist.glob("*.whl"))
    # a platform wheel: it holds the compiled classifier, built for this Python
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert wheel.name.startswith(f"atlas_milter-{__version__}-{tag}-{tag}-linux_") and wheel.name.endswith(".whl")
    return Release(src, sdist, wheel)


@pytest.fixture(scope="module")
def reference(scratch: Path, release: Release) -> dict[str, str]:
    """What the checkout itself prints (its editable install): --version, demo's verdict lines,
    classify --json of the sample mailbox (a copy outside the package)."""
    work = scratch / "reference"
    work.mkdir()
    shutil.copytree(release.src / "atlas_milter" / "data" / "sample", work / "sample")
    checkout = [sys.executable, "-m", "atlas_milter"]
    return {
        "version": f"atlas-milter {__version__}, shipped model {load_model().version}, classifier: compiled\n",
        "demo": run([*checkout, "demo", "--db", "demo.db"], cwd=work).stdout,
        "classify": run([*checkout, "classify", "--json", "sample"], cwd=work).stdout,
    }


def verdict_lines(demo_output: str) -> list[str]:
    return [line for line in demo_output.splitlines() if VERDICT_LINE.match(line)]


# ------------------------------------------------------------------ what the release holds


def test_wheel_holds_every_file_of_the_package(release: Release):
    names = set(zipfile.ZipFile(release.wheel).namelist())
    # and the compiled classifier, built for this Python
    package = {f"atlas_milter/{name}" for name in files_below(release.src / "atlas_milter")}
    assert package - names == set(), "files of atlas_milter/ missing from the wheel (pyproject.toml package-data)"
    compiled = {n for n in names if n.startswith("atlas_milter/_hotpath.") and n.endswith(".so")}
    assert len(compiled) == 1, f"the wheel holds no compiled classifier: {sorted(names)[:5]}..."
    assert {n for n in names if n.startswith("atlas_milter/")} == package | compiled
    for needed in ("data/default-model.json.gz", "data/sample/12-broken-mime.eml", "migrations/0003_imap_lookups.sql",
                   "migrations/0004_imap_accounts.sql", "migrations/0005_history_lookups.sql", "migrations/0006_decision_cutoffs.sql",
                   "migrations/0007_quarantine_actions.sql", "migrations/0008_decision_stages.sql",
                   "migrations/0009_cluster_outbox.sql", "migrations/0010_ship_marks.sql",
                   "py.typed"):
        assert f"atlas_milter/{needed}" in names


def test_sdist_holds_the_whole_source_tree(release: Release):
    """Everything git tracks (so what `make install` in the unpacked sdist needs: the
    install script, requirements.lock, the units, conf/), except .gitignore."""
    with tarfile.open(release.sdist) as tar:
        top = f"atlas_milter-{__version__}/"
        names = {m.name.removeprefix(top) for m in tar.getmembers() if m.isfile()}
    missing = files_below(release.src) - names - {".gitignore"}
    assert not missing, f"missing from the sdist (MANIFEST.in): {sorted(missing)}"


AUDIT = r"""
import json, os, sys
opened = set()
sys.addaudithook(lambda event, args: opened.add(os.fsdecode(args[0]))
                 if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) else None)
import atlas_milter
from atlas_milter.cli import main
for argv in json.loads(sys.argv[1]):
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    assert not rc, (argv, rc)
package = os.path.dirname(os.path.abspath(atlas_milter.__file__))
inside = {os.path.relpath(os.path.abspath(p), package) for p in opened}
print(json.dumps(sorted(p for p in inside if not p.startswith("..") and "__pycache__" not in p)))
"""


def test_every_package_file_the_commands_open_is_in_the_wheel(release: Release, scratch: Path):
    """The checkout runs every command that reads package files, with an audit hook listing
    what was opened below atlas_milter/ (modules, model, sample mailbox, migrations): each
    must be in the wheel. This is what failed for the model before data/*.json.gz was added."""
    work = scratch / "audit"
    work.mkdir()
    (work / "msg.eml").write_bytes((release.src / "atlas_milter/data/sample" / SAMPLE_SPAM).read_bytes())
    commands = [["--version"], ["demo", "--db", "demo.db"], ["classify", "--json", "msg.eml"], ["migrate", "--db", "m.db"],
                ["check-config", "--config", str(release.src / "conf/atlas-milter.toml")]]
    proc = run([sys.executable, "-c", AUDIT, json.dumps(commands)], cwd=work, env=user_env(ENABLE_PARALLEL="false"))
    opened = set(json.loads(proc.stdout.splitlines()[-1]))
    assert {"data/default-model.json.gz", "migrations/0001_initial.sql", f"data/sample/{SAMPLE_HAM}"} <= opened
    names = set(zipfile.ZipFile(release.wheel).namelist())
    assert {f"atlas_milter/{p}" for p in opened} - names == set(), "opened at run time but not in the wheel"


# ------------------------------------------------------------------ pip install of the wheel and the sdist


@pytest.mark.parametrize("artifact", ["wheel", "sdist"])
def test_installed_release_runs_from_anywhere(release: Release, reference: dict, scratch: Path, artifact: str):
    work = scratch / f"run-{artifact}"
    work.mkdir()
    venv = work / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=work)
    run([venv / "bin/python", "-m", "pip", "install", "-q", getattr(release, artifact)], cwd=work)
    exe = venv / "bin/atlas-milter"
    where = run([venv / "bin/python", "-c", "import atlas_milter; print(atlas_milter.__file__)"], cwd=work).stdout
    assert Path(where.strip()).is_relative_to(venv), where  # the installed package, not the checkout

    assert run([exe, "--version"], cwd=work).stdout == reference["version"]
    demo = run([exe, "demo", "--db", "demo.db"], cwd=work).stdout
    assert len(verdict_lines(demo)) == 12 and verdict_lines(demo) == verdict_lines(reference["demo"]), demo
    assert re.search(r"^12 messages in .*database demo\.db now holds 12 verdicts$", demo, re.M), demo

    shutil.copytree(release.src / "atlas_milter/data/sample", work / "sample")
    assert run([exe, "classify", "--json", "sample"], cwd=work).stdout == reference["classify"]
    [one] = [json.loads(line) for line in run([exe, "classify", "--json", f"sample/{SAMPLE_SPAM}"], cwd=work).stdout.splitlines()]
    assert one["verdict"] == "spam" and one["model_version"] == load_model().version

    assert run([exe, "migrate", "--db", "v.db"], cwd=work).stdout == f"applied {ALL_MIGRATIONS}\n"
    status = run([exe, "migrate", "--db", "v.db", "--status"], cwd=work).stdout.splitlines()
    assert len(status) == len(ALL_MIGRATIONS.split(", ")) == len(migrate.available_migrations()) and all(" applied " in line for line in status), status
    checked = run([exe, "check-config", "--config", release.src / "conf/atlas-milter.toml"], cwd=work)
    assert json.loads(checked.stdout)["store"]["db"] == "atlas-milter.db"
    assert checked.stderr.startswith(f"model {load_model().version}: spam cutoff ")


# ------------------------------------------------------------------ pipx, as one unprivileged user


def as_user(name: str, *, init_groups: bool) -> list[str]:
    """setpriv to `name` and its primary group (with its supplementary groups, or none)."""
    entry = pwd.getpwnam(name)
    groups = "--init-groups" if init_groups else "--clear-groups"
    return [require_binary("setpriv"), "--reuid", str(entry.pw_uid), "--regid", str(entry.pw_gid), groups]


def chown_tree(top: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, entry.pw_uid, entry.pw_gid)


def test_pipx_install_for_one_user(release: Release, reference: dict, scratch: Path):
    """README: `pipx install .` in the source tree, as the user who runs the IMAP listener."""
    pipx = require_binary("pipx")
    require_root("switching to an unprivileged user for pipx")
    home = scratch / "pipx-user"
    shutil.copytree(release.src, home / "atlas-milter", symlinks=True)
    chown_tree(home, "nobody")
    env = user_env(HOME=home, PIPX_HOME=home / ".local/pipx", PIPX_BIN_DIR=home / ".local/bin")
    nobody = as_user("nobody", init_groups=False)
    run([*nobody, pipx, "install", "."], cwd=home / "atlas-milter", env=env)
    exe = home / ".local/bin/atlas-milter"
    assert run([*nobody, exe, "--version"], cwd=home, env=env).stdout == reference["version"]
    sample = home / "atlas-milter/atlas_milter/data/sample" / SAMPLE_SPAM
    [one] = [json.loads(line) for line in run([*nobody, exe, "classify", "--json", sample], cwd=home, env=env).stdout.splitlines()]
    assert one["verdict"] == "spam" and one["model_version"] == load_model().version


# ------------------------------------------------------------------ the server install


def postfix_snippet(tree: Path) -> dict[str, str]:
    """The settings conf/postfix-main.cf tells the admin to put into main.cf."""
    settings = {}
    for line in (tree / "conf/postfix-main.cf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert not line[0].isspace() and "=" in line, f"unexpected line in the snippet: {line!r}"
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert settings["smtpd_milters"] == "unix:atlas-milter/milter.sock"
    return settings


def unit_command(line: str, root: Path, queue_dir: Path) -> list[str]:
    """A unit's ExecStart/ExecStartPre line as run here (see the module docstring)."""
    argv = shlex.split(line.lstrip("+-@:!").replace("/var/spool/postfix", str(queue_dir)))
    if argv[0] == "/usr/local/bin/atlas-milter":
        argv[0] = f"{root}{argv[0]}"
    return argv


@contextlib.contextmanager
def unit_milter(root: Path, postfix: PostfixInstance, log_path: Path):
    """The installed atlas-milter.service, started as systemd would start it (minus systemd)."""
    unit = unit_settings(root / "etc/systemd/system/atlas-milter.service")
    for pre in unit["ExecStartPre"]:
        assert pre.startswith("+")  # runs as root
        run(unit_command(pre, root, postfix.queue_dir), cwd=root)
    [exec_start] = unit["ExecStart"]
    [user], [group], [workdir], [umask] = unit["User"], unit["Group"], unit["WorkingDirectory"], unit["UMask"]
    assert (user, group) == (SERVICE_USER, SERVICE_USER)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"@atlas-install-test-{uuid.uuid4().hex}"
    notify.bind("\0" + address[1:])
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": pwd.getpwnam(user).pw_dir, "USER": user, "LOGNAME": user, "NOTIFY_SOCKET": address}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(as_user(user, init_groups=True) + unit_command(exec_start, root, postfix.queue_dir),
                                cwd=f"{root}{workdir}", env=env, umask=int(umask, 8), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_ready(notify, proc, log_path)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(getattr(signal, unit["KillSignal"][0]))
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(5)
        notify.close()
    assert rc == 0, f"the milter exited with {rc}:\n{log_path.read_text()[-3000:]}"


def wait_for_ready(notify: socket.socket, proc: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    notify.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "READY=1" in notify.recv(4096).decode().split("\n"):
                return
        except socket.timeout:
            pass
        if proc.poll() is not None:
            break
    pytest.fail(f"the installed milter sent no READY=1 (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}", pytrace=False)


def send_samples(postfix: PostfixInstance, tree: Path) -> dict[str, bytes]:
    """One ham and one spam sample through Postfix; {name: the delivered message}."""
    delivered = {}
    for name in (SAMPLE_HAM, SAMPLE_SPAM):
        token = new_token()
        raw = with_token((tree / "atlas_milter/data/sample" / name).read_bytes(), token)
        assert send_one(postfix.host, postfix.smtp_port, raw, [postfix.user])[0] == 250
        [path] = postfix.wait_for_message(token, timeout=30)
        delivered[name] = path.read_bytes()
    return delivered


def assert_verdict_headers(delivered: dict[str, bytes]) -> None:
    for name, expected in ((SAMPLE_HAM, "ham"), (SAMPLE_SPAM, "spam")):
        data = delivered[name]
        assert header(data, "X-Atlas-Verdict") == [expected], data[:1500]
        assert header(data, "X-Spam-Flag") == ["YES" if expected == "spam" else "NO"]
        assert re.fullmatch(r"\d\.\d{3}", header(data, "X-Atlas-Score")[0])
        assert header(data, "X-Spam-Status")[0].startswith("Yes, " if expected == "spam" else "No, ")


def milter_rows(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return con.execute("SELECT count(*) FROM processed_emails WHERE source = 'milter'").fetchone()[0]


def owner(path: Path) -> tuple[str, str, int]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)


def test_server_install_runs_mail_through_postfix_and_upgrades_in_place(release: Release, scratch: Path, servers_dir: Path,
                                                                       capsys):
    for name in ("make", "postfix", "postconf"):
        require_binary(name)
    require_root("the server install")
    if not os.access("/usr/bin/python3", os.X_OK):
        _unavailable("Debian's /usr/bin/python3 is missing")
    tree = scratch / "server"
    tree.mkdir()
    with tarfile.open(release.sdist) as tar:
        tar.extractall(tree, filter="data")
    tree = tree / f"atlas_milter-{__version__}"
    root = scratch / "root"
    root.mkdir()
    user_existed = SERVICE_USER in {u.pw_name for u in pwd.getpwall()}
    model = load_model().version
    postfix = None
    try:
        # ---- first install (README: `make install`), into the scratch root
        started = time.monotonic()
        first = run(["make", "install", f"INSTALL_ARGS=--root {root}"], cwd=tree)
        report = [f"first install {time.monotonic() - started:.0f} s: {next(line for line in first.stdout.splitlines() if 'installed atlas-milter' in line)}"]
        assert f"installed atlas-milter {__version__}, shipped model {model}, classifier: compiled" in first.stdout
        venv = root / "opt/atlas-milter"
        assert "home = /usr/bin" in (venv / "pyvenv.cfg").read_text()  # Debian's python3, not pyenv's
        assert os.readlink(root / "usr/local/bin/atlas-milter") == f"{venv}/bin/atlas-milter"
        for unit in ("atlas-milter.service", "atlas-milter-idle@.service", "atlas-milter-queue.socket",
                     "atlas-milter-queue.service"):
            assert (root / "etc/systemd/system" / unit).read_bytes() == (tree / "systemd" / unit).read_bytes()
        assert (root / "usr/lib/sysusers.d/atlas-milter.conf").is_file()
        config = root / "etc/atlas-milter/atlas-milter.toml"
        assert config.read_bytes() == (tree / "conf/atlas-milter.toml").read_bytes()
        assert owner(config) == ("root", SERVICE_USER, 0o640)
        assert owner(config.parent) == ("root", SERVICE_USER, 0o750)
        state = root / "var/lib/atlas-milter"
        assert owner(state) == (SERVICE_USER, SERVICE_USER, 0o750)
        assert_locked_runtime_only(venv, tree)
        # the service user can read its config
        run([*as_user(SERVICE_USER, init_groups=True), root / "usr/local/bin/atlas-milter", "check-config", "--config", config],
            cwd=state, env=user_env())

        # ---- the installed milter behind Postfix
        postfix = start_or_fail(PostfixInstance(servers_dir / "postfix-install", extra_config=postfix_snippet(tree)),
                                "postfix (shipped snippet)")
        log_path = scratch / "milter.log"
        with unit_milter(root, postfix, log_path) as proc:
            uids = next(line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if line.startswith("Uid:"))
            assert set(uids.split()[1:]) == {str(pwd.getpwnam(SERVICE_USER).pw_uid)}
            sock = postfix.queue_dir / "atlas-milter/milter.sock"
            assert owner(sock.parent) == (SERVICE_USER, "postfix", 0o2750) and owner(sock)[1:] == ("postfix", 0o660)
            delivered = send_samples(postfix, tree)
            assert_verdict_headers(delivered)
        report += [f"{name}: " + "; ".join(f"{h}: {header(data, h)[0]}" for h in ("X-Atlas-Verdict", "X-Spam-Status"))
                   for name, data in delivered.items()]
        db = state / "atlas-milter.db"
        assert milter_rows(db) == 2 and owner(db) == (SERVICE_USER, SERVICE_USER, 0o640)

        # ---- second install: upgrade in place, the edited config and the database kept
        edited = config.read_bytes().replace(b'log_level = "info"', b'log_level = "debug"') + b"# the admin's note\n"
        config.write_bytes(edited)
        started = time.monotonic()
        second = run(["make", "install", f"INSTALL_ARGS=--root {root}"], cwd=tree)
        assert "kept your /etc/atlas-milter/atlas-milter.toml" in second.stdout
        assert config.read_bytes() == edited and owner(config) == ("root", SERVICE_USER, 0o640)
        report.append(f"second install {time.monotonic() - started:.0f} s: the edited config is kept byte for byte "
                      f"(sha256 {hashlib.sha256(edited).hexdigest()[:16]}), the database holds {milter_rows(db)} milter rows")
        assert (config.parent / "atlas-milter.toml.dist").read_bytes() == (tree / "conf/atlas-milter.toml").read_bytes()
        assert milter_rows(db) == 2
        with unit_milter(root, postfix, log_path):
            assert_verdict_headers(send_samples(postfix, tree))
        assert milter_rows(db) == 4
        assert "Traceback" not in log_path.read_text()

        # ---- uninstall keeps config and data; --purge removes them
        run(["make", "uninstall", f"INSTALL_ARGS=--root {root}"], cwd=tree)
        gone = [venv, root / "usr/local/bin/atlas-milter", root / "etc/systemd/system/atlas-milter.service",
                root / "etc/systemd/system/atlas-milter-idle@.service", root / "etc/systemd/system/atlas-milter-queue.socket",
                root / "etc/systemd/system/atlas-milter-queue.service", root / "usr/lib/sysusers.d/atlas-milter.conf"]
        assert [p for p in gone if os.path.lexists(p)] == []
        assert config.read_bytes() == edited and milter_rows(db) == 4
        run(["make", "uninstall", f"INSTALL_ARGS=--purge --root {root}"], cwd=tree)
        assert not config.parent.exists() and not state.exists()
        with capsys.disabled():  # shown in the CI log even without -s
            print("\n" + "\n".join(f"server install: {line}" for line in report))
    finally:
        if postfix is not None:
            postfix.stop()
        if not user_existed:
            subprocess.run(["userdel", SERVICE_USER], check=False, capture_output=True)
            subprocess.run(["groupdel", SERVICE_USER], check=False, capture_output=True)


def assert_locked_runtime_only(venv: Path, tree: Path) -> None:
    """The venv holds the runtime dependencies at requirements.lock's versions, no test tools."""
    lock = {}
    for line in (tree / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[name.lower()] = version
    listed = json.loads(run([venv / "bin/python", "-m", "pip", "list", "--format=json"], cwd=venv).stdout)
    installed = {p["name"].lower(): p["version"] for p in listed}
    for name in ("atlas-milter", "pip", "setuptools"):
        installed.pop(name, None)
    assert {"pymilter", "imapclient", "sqlite-utils", "cachetools", "statsd"} <= set(installed)
    assert {name: lock.get(name) for name in installed} == installed, "not the locked versions"
    assert not {"pytest", "hypothesis", "miltertest", "build"} & set(installed)
