#!/usr/bin/env bash
# Bootstrap a development/CI environment for atlas-milter. Idempotent; seconds when already done.
#
#   scripts/bootstrap.sh            .venv with exactly the versions in requirements.lock, then the
#                                   project (`pip install -e '.[test]'`, which must add nothing: a
#                                   stale lock fails), and libmilter-dev (pymilter compiles against
#                                   it) when it is missing
#   scripts/bootstrap.sh --lock     regenerate requirements.lock (`make lock`): `pip install -e '.[test]'`
#                                   in a fresh throw-away venv, then `pip freeze` minus the project
#   scripts/bootstrap.sh --system   also the real servers the integration tests drive: postfix,
#                                   dovecot-imapd, miltertest, sqlite3, node/npm, chromium (headless, for
#                                   the /performance page test), pipx, redis-server, postgresql, npm `statsd` in
#                                   .cache/statsd, and Sendmail unpacked (never installed: it
#                                   conflicts with postfix) in .cache/sendmail (both git-ignored)
#
# System packages come from apt-get, only when something is missing and only as root; otherwise this
# prints one line naming what to install and exits 1.  Set PYTHON=/path/to/python3.11 to pick the
# interpreter.  Recipes: shared/docs/infra-recipes.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
CACHE=$ROOT/.cache
STATSD_VERSION=0.9.0

system=0
lock=0
for arg in "$@"; do
    case $arg in
        --system) system=1 ;;
        --lock) lock=1 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "bootstrap: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { printf 'bootstrap: %s\n' "$*" >&2; }
t_start=$SECONDS

mkdir -p "$CACHE"
# Two bootstraps at once (parallel make, two shells) would race on .venv and apt: serialise.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/bootstrap.lock"
    flock 9
fi

# ----------------------------------------------------------------- system packages
missing=()

[ -f /usr/include/libmilter/mfapi.h ] || missing+=(libmilter-dev)
if [ "$system" = 1 ]; then
    { [ -x /usr/sbin/postfix ] && [ -x /usr/sbin/postconf ]; } || missing+=(postfix)
    { [ -x /usr/sbin/dovecot ] && [ -x /usr/lib/dovecot/imap ]; } || missing+=(dovecot-imapd)
    command -v miltertest >/dev/null 2>&1 || missing+=(miltertest)
    command -v sqlite3 >/dev/null 2>&1 || missing+=(sqlite3)
    command -v bogofilter >/dev/null 2>&1 || missing+=(bogofilter)  # the online benchmark's yardstick (scripts/online_bench.py)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)     # throw-away CA for the TLS Dovecot (tests/support/servers.py)
    # node/npm usually come from NodeSource (nodejs bundles npm there): Debian's npm package would
    # conflict with it, so ask apt only for what is really absent.
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)
    command -v script >/dev/null 2>&1 || missing+=(bsdutils)   # postfix diagnostics (tests/support/servers.py)
    command -v m4 >/dev/null 2>&1 || missing+=(m4)               # builds the private sendmail.cf
    command -v unshare >/dev/null 2>&1 || missing+=(util-linux)  # sendmail runs in its own UTS namespace
    command -v pipx >/dev/null 2>&1 || missing+=(pipx)           # tests/test_install.py: the single-user install
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)  # [cluster]: tests/test_cluster_learning.py
    compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)  # [store] url: tests/test_pg_ship.py
    # headless browser for tests/test_web_chromium.py (~120 MB download, ~20 s, only once)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
fi

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: missing system packages: please install ${missing[*]} (as root: apt-get install ${missing[*]}), then rerun" >&2
        exit 1
    fi
    log "installing system packages: ${missing[*]}"
    t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    for try in 1 2 3; do   # another apt may hold the lists lock for a while on a new machine
        apt-get -o DPkg::Lock::Timeout=600 update -qq >"$CACHE/apt.log" 2>&1 && break
        [ "$try" = 3 ] && { tail -20 "$CACHE/apt.log" >&2; echo "bootstrap: apt-get update failed" >&2; exit 1; }
        sleep 10
    done
    if [[ " ${missing[*]} " == *" postfix "* ]]; then
        # "No configuration": writes no /etc/postfix/main.cf and never starts a system instance.
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    fi
    if ! apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" \
        >"$CACHE/apt.log" 2>&1; then
        tail -30 "$CACHE/apt.log" >&2
        echo "bootstrap: apt-get install ${missing[*]} failed (full log: .cache/apt.log)" >&2
        exit 1
    fi
    log "system packages installed in $((SECONDS - t0))s"
fi

# ----------------------------------------------------------------- Python venv
pick_python() {
    local cand
    for cand in "${PYTHON:-}" python3.11 python3; do
        [ -n "$cand" ] || continue
        command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$cand"
            return 0
        fi
    done
    return 1
}

# pip prints harmless "Location 'file://...' is ignored" lines (this machine's pip config names
# local index dirs that may be absent): drop that noise.
quiet_pip() {
    "$@" 2>&1 | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
LOCK_HEADER="# Every runtime + test dependency of atlas-milter, pinned: what scripts/bootstrap.sh installs
# and what \`make audit\` checks. Generated by \`make lock\` (scripts/bootstrap.sh --lock) from
# pyproject.toml; do not edit by hand, regenerate after changing dependencies there."

if [ "$lock" = 1 ]; then
    # Resolve with Debian's own python3 when there is one: the server install (scripts/install.sh)
    # runs on it, and its older 3.11 release needs backports a newer 3.11 does not (redis needs
    # async-timeout before 3.11.3); a lock made on a newer 3.11 would miss them.
    if [ -z "${PYTHON:-}" ] && [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        PYTHON=/usr/bin/python3
    fi
    py=$(pick_python) || { echo "bootstrap: need Python >= 3.11 (python3.11 or python3 on PATH, or PYTHON=...)" >&2; exit 1; }
    lock_venv=$CACHE/lock-venv
    rm -rf "$lock_venv"
    log "resolving '.[test]' in a fresh venv ($("$py" -V 2>&1))"
    "$py" -m venv "$lock_venv"
    quiet_pip "$lock_venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' \
        || { echo "bootstrap: pip install failed while locking" >&2; exit 1; }
    { echo "$LOCK_HEADER"; "$lock_venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
        2>/dev/null | grep -v '^atlas-milter'; } > requirements.lock.new
    mv requirements.lock.new requirements.lock
    rm -rf "$lock_venv"
    log "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
    exit 0
fi

# The stamp records what the venv was built from: its own path (a venv's scripts hard-code it, so
# a moved checkout needs a new one), pyproject.toml, requirements.lock and the C source of the
# compiled classifier (editable install: Python edits need nothing, a C edit a rebuild).
stamp_file=$VENV/.bootstrap-stamp
want_stamp="$VENV $(cat pyproject.toml requirements.lock atlas_milter/_hotpath.c | sha256sum | cut -d' ' -f1)"
venv_usable() {
    [ -x "$VENV/bin/python" ] && [ -f "$stamp_file" ] && [ "$(cut -d' ' -f1 "$stamp_file")" = "$VENV" ] \
        && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

if venv_usable && [ "$(cat "$stamp_file")" = "$want_stamp" ]; then
    :
else
    if ! py=$(pick_python); then
        echo "bootstrap: need Python >= 3.11 (python3.11 or python3 on PATH, or PYTHON=...)" >&2
        exit 1
    fi
    t0=$SECONDS
    # Always a fresh venv: a package left from an older lock would make the venv differ from it.
    rm -rf "$VENV"
    log "creating .venv with $py ($("$py" -V 2>&1))"
    "$py" -m venv "$VENV"
    # Exactly the locked versions (what CI tests is what `make audit` checked), then the project.
    log "pip install -r requirements.lock, then -e '.[test]'"
    quiet_pip "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.lock \
        || { echo "bootstrap: pip install -r requirements.lock failed" >&2; exit 1; }
    quiet_pip "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' \
        || { echo "bootstrap: pip install -e '.[test]' failed" >&2; exit 1; }
    # pip adds nothing when the lock covers pyproject.toml; anything it did add means a stale lock.
    if ! diff <(grep -v '^#' requirements.lock) \
        <("$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
          | grep -v '^atlas-milter') >"$CACHE/lock.diff"; then
        echo "bootstrap: requirements.lock does not match pyproject.toml's dependencies (see .cache/lock.diff): run \`make lock\` and commit it" >&2
        exit 1
    fi
    echo "$want_stamp" > "$stamp_file"
    log "venv ready in $((SECONDS - t0))s"
fi

# ----------------------------------------------------------------- StatsD daemon (npm)
if [ "$system" = 1 ]; then
    sd=$CACHE/statsd
    sd_stamp=$sd/.installed-$STATSD_VERSION
    if ! [ -f "$sd_stamp" ] || ! [ -f "$sd/node_modules/statsd/stats.js" ]; then
        t0=$SECONDS
        log "npm install statsd@$STATSD_VERSION into .cache/statsd"
        rm -rf "$sd"
        mkdir -p "$sd"
        # --ignore-scripts: only modern-syslog has one (a native build for the syslog backend, unused).
        npm install --prefix "$sd" --no-audit --no-fund --ignore-scripts --loglevel=error \
            "statsd@$STATSD_VERSION" >/dev/null
        touch "$sd_stamp"
        log "statsd installed in $((SECONDS - t0))s"
    fi
fi

# ----------------------------------------------------------------- Sendmail (unpacked, not installed)
# sendmail-bin Conflicts with postfix, so the packages are downloaded and unpacked with dpkg-deb
# into .cache/sendmail/root, which tests/support/servers.py SendmailInstance runs from (the .debs stay in
# .cache/sendmail/debs: a re-extract needs no network).  The rest of its dependencies are on any
# machine with postfix, except m4 (above) and liblockfile1 (only mail.local needs it: unused).
if [ "$system" = 1 ]; then
    sm=$CACHE/sendmail
    if ! [ -f "$sm/root/.extracted" ]; then
        if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
            echo "bootstrap: fetching Sendmail needs apt-get and dpkg-deb (Debian/Ubuntu); without them tests/test_sendmail_e2e.py cannot run" >&2
            exit 1
        fi
        t0=$SECONDS
        mkdir -p "$sm/debs"
        if ! ls "$sm"/debs/sendmail-bin_*.deb "$sm"/debs/sendmail-base_*.deb "$sm"/debs/sendmail-cf_*.deb \
            >/dev/null 2>&1; then
            log "apt-get download sendmail-bin sendmail-base sendmail-cf into .cache/sendmail/debs"
            fetch() {
                (cd "$sm/debs" && apt-get -q -o APT::Sandbox::User=root download \
                    sendmail-bin sendmail-base sendmail-cf) >"$CACHE/apt-sendmail.log" 2>&1
            }
            if ! fetch; then   # stale or empty package lists on a fresh machine
                apt-get -o DPkg::Lock::Timeout=600 update -qq >>"$CACHE/apt-sendmail.log" 2>&1 || true
                fetch || { tail -20 "$CACHE/apt-sendmail.log" >&2
                    echo "bootstrap: apt-get download sendmail-bin sendmail-base sendmail-cf failed (log: .cache/apt-sendmail.log)" >&2
                    exit 1; }
            fi
        fi
        rm -rf "$sm/root" "$sm/root.new"
        mkdir -p "$sm/root.new"
        for deb in "$sm"/debs/sendmail-{bin,base,cf}_*.deb; do
            dpkg-deb -x "$deb" "$sm/root.new"
        done
        touch "$sm/root.new/.extracted"
        mv "$sm/root.new" "$sm/root"
        log "sendmail unpacked into .cache/sendmail/root in $((SECONDS - t0))s"
    fi
fi

log "ready ($((SECONDS - t_start))s)"
