# The front door: `make demo` runs the whole pipeline locally, `make test` runs the tests.
# Both build .venv from nothing on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch lies on this machine's disk; unpinned torch would pull a CUDA build.
TORCH_PIN := torch==2.13.0
PIPELINE := out/torchship-pipeline.yaml

.PHONY: install demo test lint compile images clean bench bench-train bench-compress bench-vision bench-text bench-serve bench-load bench-search bench-data gpu-check

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# NVIDIA perf_analyzer 2.51.0 (only the binary of the tritonclient wheel) into $(VENV)/perf_analyzer
	$(BIN)/python -m torchship.components.benchmark.perf_analyzer --install
	touch $(STAMP)

install: $(STAMP)

compile: install
	$(BIN)/torchship compile --output $(PIPELINE)

demo: compile
	$(BIN)/torchship run $(PIPELINE) --pipeline-root runs

test: install
	$(BIN)/python -m pytest

# Performance goals live here, printed as ratios measured in one run (never as timed tests).
bench: bench-train bench-compress bench-vision bench-text bench-serve bench-load bench-search bench-data

bench-train: install
	$(BIN)/python tests/benchmarks/bench_train.py

bench-compress: install
	$(BIN)/python tests/benchmarks/bench_compress.py

bench-vision: install
	$(BIN)/python tests/benchmarks/bench_vision.py

bench-text: install
	$(BIN)/python tests/benchmarks/bench_text.py

bench-serve: install
	$(BIN)/python tests/benchmarks/bench_serve.py

bench-load: install
	$(BIN)/python tests/benchmarks/bench_load.py

# The joint serving search (variant x Triton settings under a p99 SLO) against an exhaustive
# sweep: its choice's throughput per core over the default setting's, and its wall time over
# the sweep's (goal: at most 0.5).
bench-search: install
	$(BIN)/python tests/benchmarks/bench_search.py

# Peak memory of prepare-data and of a training worker at 1x and 10x the rows (over 2 GB).
bench-data: install
	$(BIN)/python tests/benchmarks/bench_data.py

# The train stage's GPU recipe (NCCL, bf16, fp16 with loss scaling); skipped without a GPU.
gpu-check: install
	$(BIN)/python -m pytest -v tests/test_gpu.py

lint: install
	$(BIN)/ruff check components pipelines tests

# The component images (CPU, CUDA) and the Triton serving image; needs a Docker engine.
# One tag scheme for all three, as containers/cloudbuild.yaml tags them:
# [REGISTRY/]torchship-{cpu,cuda,tritonserver}:VERSION, VERSION from pyproject.toml
# (e.g. make images REGISTRY=europe-west4-docker.pkg.dev/PROJECT/REPO).
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
REGISTRY ?=
IMAGE_PREFIX = $(if $(REGISTRY),$(REGISTRY)/)torchship
CPU_IMAGE = $(IMAGE_PREFIX)-cpu:$(VERSION)
CUDA_IMAGE = $(IMAGE_PREFIX)-cuda:$(VERSION)
TRITON_IMAGE = $(IMAGE_PREFIX)-tritonserver:$(VERSION)
images:
	docker build -f containers/Dockerfile.cpu -t $(CPU_IMAGE) .
	docker build -f containers/Dockerfile.cuda -t $(CUDA_IMAGE) .
	docker build -f containers/Dockerfile.triton -t $(TRITON_IMAGE) .

clean:
	rm -rf $(VENV) out runs
