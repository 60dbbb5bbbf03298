# A fresh machine needs only Python 3.11: every target creates .venv from requirements.txt first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench

# requirements-tpu.txt (libtpu) too: tests/test_aot.py compiles for a TPU topology on this host.
$(VENV)/.installed: requirements.txt requirements-tpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt -r requirements-tpu.txt
	touch $@

setup: $(VENV)/.installed

# pytest exits 5 when it collects no test: report it rather than fail on it.
test: setup
	@$(PY) -m pytest -q --durations=15 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The CPU demo, no network: stage 1 (SPixNet) briefly, then stage 2 (the colorizer) on the photos
# scikit-image ships; rerunning continues from the checkpoints in runs/demo.
DEMO ?= runs/demo
demo: setup
	$(PY) train.py --config configs/spixnet.py:demo --workdir $(DEMO)/spixnet
	$(PY) train.py --config configs/disco.py:demo --workdir $(DEMO)/disco \
	  --config.spixnet_checkpoint=$(DEMO)/spixnet
	@echo "sample grid (gray | automatic | GT anchors | truth):" \
	  "$$(ls $(DEMO)/disco/samples/*.png | tail -n 1)"

bench: setup
	$(PY) bench/run.py
