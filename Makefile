# atlas-milter developer entry points.  Everything bootstraps itself first (scripts/bootstrap.sh is
# idempotent and takes about a second when there is nothing to do).
#
#   make demo                 run the demo
#   make test                 the whole test suite, with the real Postfix/Dovecot/StatsD servers
#   make test PYTEST_ARGS="tests/test_servers_smoke.py -q"
#   make bench                benchmark against the recorded baseline
#   make audit                pip-audit requirements.lock against the PyPI vulnerability database
#   make lock                 regenerate requirements.lock after changing dependencies in pyproject.toml
#   make soak                 30 minutes of load through Postfix + milter (scripts/soak.py; root, corpus)
#   make clean                remove .venv, .cache and build/test leftovers
#   make install              install the service on Debian/Ubuntu as root (scripts/install.sh: venv in
#                             /opt/atlas-milter, /usr/local/bin/atlas-milter, units, /etc/atlas-milter);
#                             again to upgrade. INSTALL_ARGS="--root DIR" installs below DIR
#   make uninstall            remove it; keeps /etc/atlas-milter and /var/lib/atlas-milter
#                             (INSTALL_ARGS=--purge removes them too)

SHELL := /bin/bash
VENV := .venv
PYTEST_ARGS ?=

INSTALL_ARGS ?=

.PHONY: all bootstrap bootstrap-system demo test bench audit lock soak clean install uninstall

all: test

bootstrap:
	bash scripts/bootstrap.sh

bootstrap-system:
	bash scripts/bootstrap.sh --system

demo: bootstrap
	$(VENV)/bin/atlas-milter demo

# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
test: bootstrap-system
	@rc=0; $(VENV)/bin/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing" >&2; exit 1; fi; \
	exit $$rc

bench: bootstrap
	$(VENV)/bin/atlas-milter bench --compare

# No bootstrap first: auditing needs only requirements.lock (and installs pip-audit in its own venv).
audit:
	bash scripts/audit.sh

lock:
	bash scripts/bootstrap.sh --lock

SOAK_ARGS ?=
soak: bootstrap-system
	$(VENV)/bin/python -m scripts.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# No bootstrap: these run from a checkout or an unpacked sdist with Debian's own python3.
install:
	bash scripts/install.sh $(INSTALL_ARGS)

uninstall:
	bash scripts/install.sh --uninstall $(INSTALL_ARGS)
