# The two commands of the README. Each sets up .venv by itself on a fresh machine.
.PHONY: demo test setup lint protos

VENV := .venv
PY := $(VENV)/bin/python

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh

lint: setup
	$(VENV)/bin/ruff check services tests scripts benchmarks

protos: setup
	$(PY) scripts/gen_protos.py
