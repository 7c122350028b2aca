# Two commands on a fresh machine: `make sim` (the local multi-site simulation) and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the CPU build of torch first, so nothing pulls a multi-GB CUDA build
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

.PHONY: setup sim test bench bench-core bench-gate bench-heldout bench-geometry bench-deploy bench-membership compose-check
setup: $(STAMP)

sim: $(STAMP)
	$(VENV)/bin/mome sim $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=25 $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/mome bench $(ARGS)

bench-core: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_core.py

bench-gate: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_gate_split.py $(ARGS)

bench-heldout: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_heldout.py $(ARGS)

bench-geometry: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_geometry.py $(ARGS)

bench-deploy: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_deploy_overhead.py $(ARGS)

bench-membership: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_membership.py $(ARGS)

# the committed docker-compose.yml for real: a container engine (../shared/containers/engine.sh on this project's
# machines), the image, a 3-site federation in containers, and what the container running the coordinator's app holds
ENGINE ?= ../shared/containers/engine.sh
compose-check: $(STAMP)
	bash $(ENGINE) up
	$(VENV)/bin/python -m pytest -q -rs -s tests/test_compose_run.py
