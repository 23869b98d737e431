# `make demo` and `make test` work on a fresh machine: they create .venv and install what
# they need. SSH tests need OpenSSH's sshd: `make test` installs it with apt-get when run as
# root (as in CI); elsewhere those tests skip and say why.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench sshd clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	@echo "cronfile center: schedules/ -> state in .state/ (Ctrl-C to stop)"
	@echo "  in another shell:  $(BIN)/cronfile runs --state .state   |   $(BIN)/cronfile status --state .state"
	$(BIN)/cronfile center --schedules schedules --state .state

sshd:
	@test -x /usr/sbin/sshd || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server; } || \
	  echo "sshd not installed: SSH tests will be skipped"

lint: $(STAMP)
	$(BIN)/ruff check cronfile tests bench

typecheck: $(STAMP)
	$(BIN)/mypy cronfile

unit: $(STAMP)
	$(BIN)/pytest -q

test: $(STAMP) sshd lint typecheck unit

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .state .pytest_cache .mypy_cache .ruff_cache
