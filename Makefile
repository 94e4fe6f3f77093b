# The two quick-start commands: `make demo` and `make test` (both create .venv on first use).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint docs test-deps

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/pctune search demo

lint: install
	$(BIN)/ruff check pctune tests benchmarks scripts
	$(BIN)/pylint --disable=all --enable=duplicate-code pctune

# The reference documentation (docs/, MkDocs + material); --strict fails on broken links.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

# The MLflow UI test drives Debian's headless Chromium; install it where apt can (root, Debian).
test-deps:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "note: chromium not installed; the MLflow UI test will be skipped"; }
# tests/test_ray_up_local.py runs `ray up` with a loopback sshd as the head: openssh-server, rsync, nc.
	@{ command -v /usr/sbin/sshd && command -v rsync && command -v nc; } >/dev/null 2>&1 || { \
		command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync netcat-openbsd >/dev/null) \
		|| echo "note: openssh-server/rsync/netcat-openbsd not installed; the ray up test will be skipped"; }

test: lint docs test-deps
	$(BIN)/python -m pytest
