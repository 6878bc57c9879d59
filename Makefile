# Two commands matter: `make demo` (set up + run the main job on generated demo data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := data/demo
# Every rank would otherwise start one BLAS thread per core; two ranks on two cores thrash.
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu

.PHONY: install demo demo-data test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo-data: $(STAMP)
	$(PY) -m data_prep.demo $(DEMO)/audio
	$(PY) -m data_prep.shard $(DEMO)/audio/speech $(DEMO)/shards/speech --layout files --sample-rate 16000 --channels 1 --chunk-seconds 4 --valid-fraction 0.2 --max-per-shard 4
	$(PY) -m data_prep.shard $(DEMO)/audio/musdb $(DEMO)/shards/musdb --layout musdb --sample-rate 16000 --channels 2 --chunk-seconds 6 --max-per-shard 4
	$(PY) -m data_prep.verify $(DEMO)/shards/speech
	$(PY) -m data_prep.verify $(DEMO)/shards/musdb

DEMO_STEPS ?= 300

demo: demo-data
	$(PY) launch/demo.py --data $(DEMO) --runs-dir runs --out out/demo --steps $(DEMO_STEPS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow" --durations=15

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf runs out/demo $(DEMO) .pytest_cache
