# One venv per checkout (override with VENV=/path). torch/torchvision are pinned here because
# pip on this kind of machine takes exactly these builds from a local cache (they run on CPUs).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sammix-installed

.PHONY: install test test-all demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# the fast tier (CI): unit and contract tests, tiny models, the real models where a contract needs them
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# everything: adds real training, experiment grids, the registry download and end-to-end predictions
test-all: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/sammix demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
