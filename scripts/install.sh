#!/usr/bin/env bash
# Install atlas-milter as a service on Debian/Ubuntu, as root, from this source tree (a git
# checkout or an unpacked sdist): `make install`, i.e. scripts/install.sh.
#
#   /opt/atlas-milter/               a private venv of Debian's own /usr/bin/python3 (PEP 668 keeps
#                                    pip out of the system Python) holding the wheel built from
#                                    this tree and its runtime dependencies at requirements.lock's versions
#   /usr/local/bin/atlas-milter      a link to /opt/atlas-milter/bin/atlas-milter (the units' ExecStart)
#   /etc/systemd/system/             atlas-milter.service, atlas-milter-idle@.service and the
#                                    quarantine's queue helper (atlas-milter-queue.socket/.service)
#   /usr/lib/sysusers.d/atlas-milter.conf   and the system user atlas-milter it describes
#   /etc/atlas-milter/atlas-milter.toml     conf/atlas-milter.toml, 0640 root:atlas-milter. An
#                                    existing file is never changed: the new example goes next
#                                    to it as atlas-milter.toml.dist
#   /var/lib/atlas-milter/           the verdict database's directory, atlas-milter:atlas-milter 0750
#
# Running it again upgrades the venv in place (same Python: kept; else rebuilt) and keeps
# config and data; with systemd running it reloads the units and restarts the running ones.
#
#   scripts/install.sh --uninstall [--purge]   remove the venv, the link, the units and the
#       sysusers file; /etc/atlas-milter and /var/lib/atlas-milter stay unless --purge. The
#       user atlas-milter stays (its files may remain in backups or elsewhere).
#   --root DIR   install below DIR instead of / (the tests' scratch root). The system user is
#       still created on this machine, and systemctl is not called.
#
# Missing system packages (python3 python3-venv python3-dev gcc libmilter-dev: pymilter
# compiles against libmilter) are installed with apt-get. A problem ends with one line saying
# what to do and exit status 1.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=/usr/bin/python3
USER_NAME=atlas-milter
PACKAGES=(python3 python3-venv python3-dev gcc libmilter-dev)

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

root=""
uninstall=0
purge=0
while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root=${2%/}; shift ;;
        --uninstall) uninstall=1 ;;
        --purge) purge=1 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[ "$purge" = 0 ] || [ "$uninstall" = 1 ] || die "--purge goes with --uninstall"
if [ -n "$root" ]; then
    [ -d "$root" ] || die "--root $root: no such directory"
    root=$(cd "$root" && pwd)
fi

VENV=/opt/atlas-milter
LINK=/usr/local/bin/atlas-milter
UNIT_DIR=/etc/systemd/system
UNITS=(atlas-milter.service atlas-milter-idle@.service atlas-milter-queue.socket atlas-milter-queue.service)
SYSUSERS=/usr/lib/sysusers.d/atlas-milter.conf
ETC=/etc/atlas-milter
CONFIG=$ETC/atlas-milter.toml
STATE=/var/lib/atlas-milter

[ "$(id -u)" = 0 ] || die "run as root (sudo make install)"
{ command -v apt-get && command -v dpkg-query; } >/dev/null 2>&1 \
    || die "this installer is for Debian/Ubuntu (apt-get, dpkg); elsewhere use a venv or pipx (README, Install)"

# systemctl only for the real system, and only when systemd runs it.
systemd_running() { [ -z "$root" ] && [ -d /run/systemd/system ]; }

# ----------------------------------------------------------------- uninstall
if [ "$uninstall" = 1 ]; then
    if systemd_running; then
        systemctl stop atlas-milter.service 'atlas-milter-idle@*.service' atlas-milter-queue.socket atlas-milter-queue.service || true
        systemctl disable "${UNITS[@]}" >/dev/null 2>&1 || true
    fi
    rm -rf "$root$VENV"
    [ ! -L "$root$LINK" ] || rm -f "$root$LINK"
    for unit in "${UNITS[@]}"; do rm -f "$root$UNIT_DIR/$unit"; done
    rm -f "$root$SYSUSERS"
    if systemd_running; then systemctl daemon-reload; fi
    if [ "$purge" = 1 ]; then
        rm -rf "$root$ETC" "$root$STATE"
        say "removed atlas-milter, its configuration ($ETC) and its data ($STATE); the user $USER_NAME stays"
    else
        say "removed atlas-milter; kept $ETC and $STATE (remove them with --uninstall --purge)"
    fi
    exit 0
fi

# ----------------------------------------------------------------- checks and system packages
for f in pyproject.toml README.md requirements.lock atlas_milter/__init__.py migrations conf/atlas-milter.toml \
    systemd/atlas-milter.service systemd/atlas-milter-idle@.service systemd/atlas-milter-queue.socket \
    systemd/atlas-milter-queue.service systemd/atlas-milter.sysusers; do
    [ -e "$SRC/$f" ] || die "$SRC/$f is missing: run this from a complete atlas-milter checkout or unpacked sdist"
done
if [ -e "$root$LINK" ] && [ ! -L "$root$LINK" ]; then
    die "$root$LINK exists and is not a link (an earlier pip install?): remove it, then rerun"
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" = installed ] || missing+=("$pkg")
done
log=$(mktemp /tmp/atlas-milter-install.XXXXXX.log)
tmp=$(mktemp -d /tmp/atlas-milter-install.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get -o DPkg::Lock::Timeout=600 update -q \
           && apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        tail -15 "$log" >&2
        die "apt-get install ${missing[*]} failed (log: $log): fix apt, then rerun"
    fi
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); atlas-milter needs Python 3.11 or later (Debian 12, Ubuntu 24.04)"

# ----------------------------------------------------------------- the user (sysusers file first)
install -D -m 0644 "$SRC/systemd/atlas-milter.sysusers" "$root$SYSUSERS"
if ! getent passwd "$USER_NAME" >/dev/null; then
    say "creating the system user $USER_NAME"
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers "$root$SYSUSERS"
    else
        adduser --system --group --home "$STATE" --no-create-home "$USER_NAME" >/dev/null
    fi
fi

# ----------------------------------------------------------------- the venv and the package
venv_python=$root$VENV/bin/python
py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
if [ "$(py_version "$venv_python")" != "$(py_version "$PYTHON")" ]; then
    say "creating the venv $root$VENV ($("$PYTHON" -V 2>&1))"
    rm -rf "$root$VENV"
    mkdir -p "$(dirname "$root$VENV")"
    "$PYTHON" -m venv "$root$VENV" >"$log" 2>&1 || { cat "$log" >&2; die "$PYTHON -m venv failed: apt-get install python3-venv, then rerun"; }
fi

venv_pip() {
    "$venv_python" -m pip --disable-pip-version-check "$@" >>"$log" 2>&1 \
        || { grep -v "^WARNING: Location 'file://.*' is ignored" "$log" | tail -20 >&2
             die "pip $1 failed (log: $log): check the network to PyPI, then rerun"; }
}
# The wheel is built from a copy of its inputs: setuptools reuses build/ in the tree it builds
# in, where a file deleted from the package would live on.
mkdir -p "$tmp/src" "$tmp/dist"
cp -a "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/atlas_milter" "$SRC/migrations" "$tmp/src/"
find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
say "building the wheel and installing it with its locked dependencies into $root$VENV"
venv_pip wheel -q --no-deps --wheel-dir "$tmp/dist" "$tmp/src"
wheel=$(echo "$tmp"/dist/atlas_milter-*.whl)
[ -f "$wheel" ] || die "no wheel was built (log: $log)"
venv_pip install -q --constraint "$SRC/requirements.lock" "$wheel"
venv_pip install -q --no-deps --force-reinstall "$wheel"   # same version number, new code: replace it
rm -f "$log"

# ----------------------------------------------------------------- link, units, config, data
mkdir -p "$(dirname "$root$LINK")"
ln -sfn "$root$VENV/bin/atlas-milter" "$root$LINK"
for unit in "${UNITS[@]}"; do
    install -D -m 0644 "$SRC/systemd/$unit" "$root$UNIT_DIR/$unit"
done
install -d -m 0750 -o root -g "$USER_NAME" "$root$ETC"
if [ -e "$root$CONFIG" ]; then
    install -m 0640 -o root -g "$USER_NAME" "$SRC/conf/atlas-milter.toml" "$root$CONFIG.dist"
    say "kept your $CONFIG; this version's annotated example is $CONFIG.dist"
else
    install -m 0640 -o root -g "$USER_NAME" "$SRC/conf/atlas-milter.toml" "$root$CONFIG"
fi
install -d -m 0750 -o "$USER_NAME" -g "$USER_NAME" "$root$STATE"

if systemd_running; then
    systemctl daemon-reload
    systemctl try-restart atlas-milter.service 'atlas-milter-idle@*.service' atlas-milter-queue.service
fi
say "installed $("$root$LINK" --version)"
getent group postfix >/dev/null \
    || say "note: there is no group postfix: atlas-milter.service's ExecStartPre needs Postfix (for Sendmail see the unit's header)"
say "next: edit $CONFIG, add the settings in $SRC/conf/postfix-main.cf to /etc/postfix/main.cf, then: systemctl enable --now atlas-milter"
