# Set-up, tests and demo on a fresh Debian machine (2 CPU cores is enough).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_VIDEO := tests/data/face_2s.mp4

.PHONY: install system-deps test lint demo clean

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
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

lint: install
	$(PY) -m ruff check dubtool tests

test: install lint
	$(PY) -m pytest -q

# Until `dubtool dub` lands, the demo runs the landmark stage on the bundled clip.
demo: install
	$(VENV)/bin/dubtool landmarks $(DEMO_VIDEO) -o demo_landmarks.mp4 --json demo_landmarks.json
	@echo "demo written: $(CURDIR)/demo_landmarks.mp4 (points drawn on every frame)"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_landmarks.mp4 demo_landmarks.json
