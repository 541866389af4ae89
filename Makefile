# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-*.txt 2>/dev/null | sha1sum | cut -c1-12)
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296

.PHONY: setup sysdeps demo test test-fast lint clean-demo gpu-check

## sysdeps: apt packages FFCV needs to build (only when running as root and they are missing)
sysdeps:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "[setup] apt-get install $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "[setup] missing apt packages: $$missing (run as root or install them; FFCV needs them)"; fi; \
	fi

## setup: .venv with the pinned requirements (idempotent: re-runs only when requirements change)
setup: $(STAMP)
$(STAMP): requirements.txt | sysdeps
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt $$(ls requirements-*.txt 2>/dev/null | sed 's/^/-r /')
	@rm -f $(VENV)/.installed-* && touch $@

## demo: built-in dataset -> DINO (then INTL) pretraining on the CPU -> kNN (pretrained vs random init) + images/s
demo: setup
	$(PY) -m pipeline.convert.demo_dataset --out data/demo
	$(PY) convert_dataset.py --src data/demo/train --out data/demo --format both -q
	$(PY) convert_dataset.py --src data/demo/val --out data/demo --format both -q \
	  --class-index data/demo/ffcv/train.classes.json
	@# --overwrite: a previous demo run is moved to runs/<name>.old-<time> (make clean-demo removes both)
	$(PY) train.py --method dino --config configs/exp/dino_demo.yaml train.knn_at_end=false --overwrite
	$(PY) eval.py knn --checkpoint runs/dino_demo --train-dir data/demo/train --val-dir data/demo/val \
	  --random-baseline --report runs/dino_demo
	@# then INTL: a second loss family (whitening, no teacher) on the same data, about 2 minutes (docs/results.md)
	$(PY) train.py --method intl --config configs/exp/intl_demo.yaml train.knn_at_end=false --overwrite
	$(PY) eval.py knn --checkpoint runs/intl_demo --train-dir data/demo/train --val-dir data/demo/val \
	  --random-baseline --report runs/intl_demo

## test: the whole suite (CPU). Slow tests are included; `make test-fast` skips them.
test: setup
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests -> failure" >&2; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache  # the layer contract of pyproject.toml

clean-demo:
	rm -rf runs/dino_demo runs/intl_demo runs/dino_demo.old-* runs/intl_demo.old-*

## gpu-check: on a GPU machine, every CUDA-only piece in <= 8 min -> gpu_report/report.md (docs/gpu_check.md).
## Runs with that machine's own python3 and packages (no .venv, no setup): `make gpu-check PYTHON=...` to change.
PYTHON ?= python3
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check
