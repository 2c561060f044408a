# Set-up, tests and demo on a fresh Debian machine (2 CPU cores is enough).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_VIDEO := dubtool/data/may_5s.mp4
DEMO_SPEECH := tests/data/demo_speech.m4a

.PHONY: install system-deps test lint demo gpu-check clean

install: system-deps $(VENV)/.installed

# Debian's ffmpeg decodes and encodes everything; espeak-ng makes speech for tests.
system-deps:
	@if ! command -v ffmpeg >/dev/null || ! command -v espeak-ng >/dev/null; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq ffmpeg espeak-ng >/dev/null; \
	fi

# torch==2.13.0 first: it is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,identity]"
	# librosa (dubtool eval, the tests) compiles its numba kernels on first import: ~35 s once,
	# here rather than in the first command. The dub itself does not import librosa.
	$(PY) -c "import librosa, numpy; librosa.feature.melspectrogram(y=numpy.zeros(4000, 'float32'))"
	touch $@

# ruff, and the layers of .importlinter: an upward import or an import circle fails the tests.
lint: install
	$(PY) -m ruff check dubtool tests
	$(VENV)/bin/lint-imports --no-logo --no-cache

test: install lint
	$(PY) -m pytest -q

# On a CUDA machine (with a CUDA build of torch in the venv): the cuda-marked
# tests, bench of cpu-128 and of an untrained paper-256, 200 bf16 steps of the paper-256
# dubber; one table, gpu-check.json. Without a GPU it says so and fails.
gpu-check: install
	$(PY) tests/gpu_check.py --out gpu-check.json

# Dubs the bundled clip with the bundled speech, using the shipped model.
demo: install
	$(VENV)/bin/dubtool dub $(DEMO_VIDEO) $(DEMO_SPEECH) -o demo_out.mp4
	@echo "demo written: $(CURDIR)/demo_out.mp4"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_out.mp4 gpu-check.json
