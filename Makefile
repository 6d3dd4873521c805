# gactor: `make serve` runs the server, `make test` runs the whole suite (both as root).
VENV        := .venv
PY          := $(VENV)/bin/python
LISTEN      ?= 127.0.0.1:7777
ROOTFS_DIR  ?= $(or $(GACTOR_ROOTFS_DIR),/var/lib/gactor/images/busybox)
PYTEST_ARGS ?=

export GACTOR_ROOTFS_DIR := $(ROOTFS_DIR)

.PHONY: setup serve test lint bench

setup:
	bash scripts/setup.sh

serve: setup
	exec $(VENV)/bin/gactor server --listen $(LISTEN) --default-rootfs $(ROOTFS_DIR)

test: setup
	$(VENV)/bin/ruff check gactor tests bench
	$(VENV)/bin/mypy gactor
	$(VENV)/bin/pytest -q tests $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check gactor tests bench
	$(VENV)/bin/ruff format --check gactor tests bench
	$(VENV)/bin/mypy gactor

bench: setup
	$(PY) -m bench
