# `make demo` and `make test` work on a fresh machine: they create .venv and install what
# they need. SSH tests need OpenSSH's sshd: `make test` installs it with apt-get when run as
# root (as in CI); elsewhere those tests skip and say why.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick test-latest lock lint typecheck unit bench sshd postgresql clean

# The tests run in PYTEST_WORKERS processes (pytest-xdist). Most of them wait on real time
# (1 s cron slots, heartbeats, leases, process start-ups), not on the CPU, so 3 workers on
# 2 cores take about half the wall time of one. Tests go to whichever worker is free
# (--dist load): keeping a file's tests on one worker (loadfile) left one worker running
# the slowest files alone at the end. A module fixture (the PostgreSQL server, sshd) then
# starts once per worker that runs its file. PYTEST_WORKERS=0 runs everything in one
# process (for pdb, or -x).
PYTEST_WORKERS ?= 3
PYTEST_XDIST := -n $(PYTEST_WORKERS) --dist load

# Installs take the exact versions in requirements.lock, so a new upstream release cannot
# turn main red for an unrelated change; `make test-latest` resolves the newest instead.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[test,bench]'
	touch $(STAMP)

LATEST := .venv-latest
# The same checks on the newest release of every dependency (no lock): a failure here is
# an upstream change to act on (fix, then `make lock`), not a broken main.
test-latest: sshd postgresql
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade -e '.[test,bench]'
	$(LATEST)/bin/pip freeze --exclude-editable | grep -v '^cronfile' > $(LATEST)/freeze.txt
	$(LATEST)/bin/ruff check cronfile tests bench
	$(LATEST)/bin/mypy cronfile
	$(LATEST)/bin/pytest -q $(PYTEST_XDIST)

# Rewrite requirements.lock from the versions test-latest just passed with.
lock:
	test -f $(LATEST)/freeze.txt || { echo "run make test-latest first"; exit 2; }
	{ sed -n '1,/^$$/p' requirements.lock | grep '^#'; cat $(LATEST)/freeze.txt; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

demo: $(STAMP)
	@echo "cronfile center: schedules/ -> state in .state/ (Ctrl-C to stop)"
	@echo "  in another shell:  $(BIN)/cronfile runs --state .state   |   $(BIN)/cronfile status --state .state"
	$(BIN)/cronfile center --schedules schedules --state .state --log-runs

sshd:
	@test -x /usr/sbin/sshd || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server; } || \
	  echo "sshd not installed: SSH tests will be skipped"

# The HA tests start their own PostgreSQL server from Debian's package (SPEC §9).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } || \
	  echo "PostgreSQL not installed: HA tests will be skipped"

lint: $(STAMP)
	$(BIN)/ruff check cronfile tests bench

typecheck: $(STAMP)
	$(BIN)/mypy cronfile

unit: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_XDIST)

test: $(STAMP) sshd postgresql lint typecheck unit

# While editing: everything but the tests marked slow (CI and `make test` run those too).
test-quick: $(STAMP) sshd postgresql lint typecheck
	$(BIN)/pytest -q $(PYTEST_XDIST) -m 'not slow'

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(LATEST) .state .pytest_cache .mypy_cache .ruff_cache
