# Set-up is part of every target: a fresh clone needs nothing but pyenv's Python 3.12.
# .python-version names 3.12 (ArviZ 1.x needs it); take pyenv's newest 3.12.x, else python3.12.
PYTHON_VERSION := $(shell cat .python-version)
PYENV_PYTHON := $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/$(PYTHON_VERSION)*/bin/python)))
PYTHON_FOR_VENV := $(if $(PYENV_PYTHON),$(PYENV_PYTHON),python$(PYTHON_VERSION))
VENV := .venv
BIN := $(VENV)/bin

.PHONY: env compare test bench lock clean

# The environment is the locked set (requirements.lock: what CI tested), then the package
# itself without resolving anything again.
$(BIN)/ppl-notes: setup.cfg pyproject.toml requirements.lock
	$(PYTHON_FOR_VENV) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

env: $(BIN)/ppl-notes

compare: env  ## the main job: SVI and NUTS on Galton's heights, side by side
	$(BIN)/ppl-notes compare heights --out out/heights

test: env  ## the whole test suite (what CI runs)
	$(BIN)/ruff check ppl_notes tests benchmarks
	$(BIN)/lint-imports  # the layers of docs/architecture.md, and no import cycles (pyproject.toml)
	$(BIN)/python -m pytest -n auto --dist loadgroup --durations=25  # both cores (pytest-xdist); fits are shared within a worker, the Dask cluster within its group

bench: env  ## speed against plain Pyro and NumPyro (run by hand)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_facade.py
	$(BIN)/python benchmarks/bench_nuts.py
	$(BIN)/python benchmarks/bench_peers.py
	$(BIN)/python benchmarks/bench_svi.py

# Refresh the lock on purpose: the newest versions setup.cfg allows (within the machine's
# own pip constraints, where it has them, since pip applies those on install too).
PIP_CONSTRAINTS := $(wildcard /etc/xdg/pip/constraints.txt)
lock: env  ## re-resolve requirements.lock from setup.cfg (then run make test)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile setup.cfg --extra test --extra notebooks --extra cluster --python-version 3.12 \
		--python-platform x86_64-manylinux_2_28 $(addprefix -c ,$(PIP_CONSTRAINTS)) \
		--no-header --quiet -o requirements.lock

clean:
	rm -rf $(VENV) out *.egg-info
