#!/usr/bin/env bash
# Audit requirements.lock (every runtime + test dependency, pinned: exactly what
# scripts/bootstrap.sh installs and CI tests) against the PyPI vulnerability database with
# pip-audit. `make audit` runs this; .ci/run runs it before `make test`.
#
# pip-audit lives in its own venv (.cache/pip-audit, pinned version below), so its own
# dependencies neither change the project's .venv nor end up in the lock. It checks the
# pinned names and versions as they are (--no-deps --disable-pip: nothing is installed or
# resolved), using PyPI's service (-s pypi; OSV may be unreachable from CI).
#
# Exit 0: no known vulnerability. Exit 1: a vulnerability (listed), or the service could not
# be reached / answered badly (one line saying so): an audit that did not run never passes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PIP_AUDIT_VERSION=2.10.1
venv=.cache/pip-audit

[ -f requirements.lock ] || { echo "audit: requirements.lock is missing: run \`make lock\`" >&2; exit 1; }
mkdir -p .cache
if ! [ -x "$venv/bin/pip-audit" ] || [ "$(cat "$venv/.version" 2>/dev/null)" != "$PIP_AUDIT_VERSION" ]; then
    py=.venv/bin/python
    [ -x "$py" ] || py=$(command -v python3)
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "pip-audit==$PIP_AUDIT_VERSION" 2>&1 \
        | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "audit: could not install pip-audit $PIP_AUDIT_VERSION from PyPI" >&2; exit 1; }
    echo "$PIP_AUDIT_VERSION" > "$venv/.version"
fi

out=$(mktemp)
err=$(mktemp)
trap 'rm -f "$out" "$err"' EXIT
rc=0
"$venv/bin/pip-audit" -r requirements.lock --no-deps --disable-pip -s pypi --strict \
    --progress-spinner off --timeout 20 >"$out" 2>"$err" || rc=$?
# --no-deps makes pip-audit recommend hashes on every run: not news, drop it.
grep -v -e 'users are encouraged to fully hash' -e 'Consider using a tool like `pip-compile`' "$err" >"$err.keep" || true
mv "$err.keep" "$err"
n=$(grep -vc '^#' requirements.lock)

if [ "$rc" = 0 ]; then
    echo "audit: ${n} locked packages, no known vulnerabilities (PyPI advisory database)"
    exit 0
fi
if grep -qE 'ConnectionError|ProxyError|MaxRetryError|NameResolutionError|Timeout|SSLError|ServiceError|HTTPError' "$err"; then
    reason=$(grep -E '^[A-Za-z_.]+(Error|Exception|Timeout)[^ ]*:' "$err" | tail -1 | cut -c1-200)
    echo "audit: FAILED: the PyPI vulnerability service could not be reached, so nothing was audited" \
         "(${reason:-see the pip-audit output}); check the network/proxy and rerun \`make audit\`" >&2
    exit 1
fi
if grep -q 'Dependency not found on PyPI' "$err" && ! grep -q 'known vulnerabilit' "$out" "$err"; then
    first=$(grep -m1 -o 'could not be audited: .*' "$err" | cut -c23-)
    echo "audit: FAILED: the PyPI vulnerability service had no answer for $first" \
         "(https://pypi.org/pypi/NAME/VERSION/json answered 404), so the lock was not audited;" \
         "check that this machine reaches pypi.org's JSON API directly and rerun \`make audit\`" >&2
    exit 1
fi
cat "$out"
cat "$err" >&2
if grep -q 'known vulnerabilit' "$out" "$err"; then
    echo "audit: FAILED: known vulnerabilities above; raise the version in pyproject.toml, run \`make lock\`" \
         "and commit requirements.lock" >&2
else
    echo "audit: FAILED: pip-audit exited $rc (output above)" >&2
fi
exit 1
