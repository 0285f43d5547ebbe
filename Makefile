# Two commands on a fresh machine: `make repro` (set up + run the pipeline), `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATASET_DIR := /usr/share/datasets/fashion-mnist
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv venv-gpu venv-serve lock dataset browser params repro test test-fast lint format bench ci ci-steps validate restore experiments report release clean

# The environment is the lock's, exactly (hashes checked; anything else in the venv is removed),
# plus this project as an editable package. LOCK=requirements-gpu.lock for the GPU build.
# uv comes from the lock too; the bootstrap copy is pinned to the same release.
# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (as on these CI machines), Python never
# caches .pyc files, so every dvc and stage process would recompile its imports: a fresh clone's
# `make test` took 16.7 min without it, 8.0 min with it (same machine, same hour); it adds ~20 s here.
LOCK ?= requirements-dev.lock
UV_VERSION := $(shell sed -n 's/^uv==\([^ ]*\).*/\1/p' requirements-dev.lock)
$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q uv==$(UV_VERSION)
	@$(PY) -c 'import platform, sys; sys.exit(0 if sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64" and sys.platform == "linux" else 1)' \
		|| { echo "error: the locks are for Linux x86_64 with Python 3.11; on this platform use: $(PY) -m pip install -e '.[dev]'" >&2; exit 1; }
	$(VENV)/bin/uv pip sync -q --compile-bytecode --python $(PY) --require-hashes $(LOCK)
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e .
	touch $@

venv: $(STAMP)

# The GPU build (docs/gpu.md "Running on a GPU"): TensorFlow with CUDA instead of tensorflow-cpu.
venv-gpu:
	rm -f $(STAMP)
	$(MAKE) venv LOCK=requirements-gpu.lock

# What a service needs to classify with the exported ONNX model and nothing more (no TensorFlow,
# Keras or pandas): requirements-serve.lock plus this project without its dependencies.
# docs/serving.md "Serving the model"; tests/test_export.py builds one and runs wardrobe predict in it.
SERVE_VENV ?= .venv-serve
venv-serve: venv
	test -x $(SERVE_VENV)/bin/python || $(PY) -m venv --without-pip $(SERVE_VENV)
	$(VENV)/bin/uv pip sync -q --python $(SERVE_VENV)/bin/python --require-hashes requirements-serve.lock
	$(VENV)/bin/uv pip install -q --python $(SERVE_VENV)/bin/python --no-deps .

# Re-write the locks from pyproject.toml (keeps existing pins; UPGRADE=1 takes the newest allowed).
lock: venv
	UPGRADE=$(UPGRADE) .ci/lock

# Best effort and never fatal (.ci/apt-install: retries, waits for dpkg's lock, shows apt's error):
# on Debian/Ubuntu as root, install the dataset package if missing;
# otherwise prepare falls back to the HTTPS mirrors listed in params.yaml.
dataset:
	@if [ ! -e $(DATASET_DIR)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian package dataset-fashion-mnist (best effort)"; \
		.ci/apt-install dataset-fashion-mnist; \
		test -e $(DATASET_DIR)/train-images-idx3-ubyte.gz || echo "dataset-fashion-mnist not installed; prepare will try the mirrors"; \
	fi

# Debian's chromium, for the test that opens `dvc plots show` pages offline (same best effort).
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian package chromium (best effort)"; \
		.ci/apt-install chromium; \
		command -v chromium >/dev/null || echo "chromium not installed; the offline plots test will be skipped"; \
	fi

# params.yaml from conf/ (Hydra), as `dvc exp run` composes it, without running anything.
params: venv
	$(VENV)/bin/wardrobe params

repro: venv dataset
	dvc repro

# Test files run in parallel, one worker per core (pytest-xdist): most of the suite waits on
# single-threaded work (TensorFlow imports, graph tracing, dvc and git subprocesses). A file
# stays on one worker, so its module fixtures (a tiny pipeline run) are built once.
TEST_WORKERS ?= auto
test: venv
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The unit tier: no subprocess pipelines (tests marked `pipeline` by tests/conftest.py).
test-fast: venv
	$(PY) -m pytest -m "not pipeline"

# Also: the locks match pyproject.toml, and the GitHub workflow passes a security audit (any
# finding fails: unpinned actions, template injection, broad permissions, persisted credentials).
lint: venv
	.ci/lock --check
	$(VENV)/bin/zizmor --offline --quiet .github/workflows
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mkdocs build --strict --quiet  # docs/: a broken link or an unlisted page fails

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: venv dataset
	$(PY) -m bench.run --steps
	$(PY) -m bench.serve
	$(PY) -m bench.serve_load
	$(PY) -m bench.folder
	$(PY) -m bench.scale
	$(PY) -m bench.trust

# What CI does with the pipeline (.github/workflows/ci.yml runs exactly `make ci`):
# reproduce, validate against BASE, write report.md. BASE defaults to the last commit.
BASE ?= HEAD
ci: venv dataset ci-steps

# The gate runs once: validate writes its verdict (one problem per line, empty when it passed),
# the report states it, and the step fails with validate's status, so the report is written
# even when the gate fails.
VERDICT := validation.txt
# With a default DVC remote configured (`dvc remote default` names one), `dvc repro --pull`: a stage
# whose inputs match dvc.lock gets its outputs from the remote instead of running (DVC runs it
# anyway if the remote lacks them), so a change that touches no stage's inputs trains nothing.
# Without a remote (a fresh clone of this repository, .ci/run) plain `dvc repro` runs what is
# missing, the whole pipeline. PULL=0 never pulls (the workflow sets it where there are no secrets).
PULL ?= auto
REPRO_PULL = $(if $(filter-out 0,$(PULL)),$(shell PATH="$(PATH)" dvc remote default >/dev/null 2>&1 && echo --pull))
ci-steps:
	dvc repro $(REPRO_PULL)
	wardrobe validate --against $(BASE) --verdict $(VERDICT); gate=$$?; \
	wardrobe report --base $(BASE) --gate $(VERDICT) && exit $$gate

validate: venv
	$(VENV)/bin/wardrobe validate

# Back to the committed results after `dvc exp run` / `dvc exp apply` left an experiment's in the
# workspace (docs/experiments.md "Experiments"): what git tracks (params, lock, metrics, plots, live log) from
# the last commit, then the cached outputs that dvc.lock names (model, prepared data, exports).
# Uncommitted edits to those files are discarded; conf/ and code are left alone.
restore: venv
	git checkout HEAD -- params.yaml dvc.lock metrics plots dvclive
	dvc checkout

# The experiments table that fits a screen (docs/experiments.md "Experiments"): the headline metrics, a running
# experiment's latest epoch (step, eval.accuracy: DVCLive's), and only the params that differ;
# best test accuracy first. What it leaves out (per-class scores, export parity, environment,
# dependency hashes) is in plain `dvc exp show`. ARGS adds dvc exp show options, e.g. ARGS=--csv.
EXPERIMENTS_DROP := per_class\.|ece|brier|temperature|accepted|ood_|saved_model\.|onnx\.|test_images|tta_views|keras|train\.(accuracy|loss)$$|eval\.loss|python|tensorflow|numpy|device|kernels|replicas|precision|data/|stages/|plots/|metrics/|requirements
experiments: venv
	@dvc exp show --only-changed --keep '(Experiment|accuracy|macro_f1|val_accuracy|loss)$$' --drop '$(EXPERIMENTS_DROP)' \
		--sort-by accuracy --sort-order desc $(ARGS)

report: venv
	wardrobe validate --against $(BASE) --verdict $(VERDICT); \
	wardrobe report --base $(BASE) --gate $(VERDICT)

# Register a model version the way GTO does: an annotated tag <artifact>@vX.Y.Z, which is how
# `dvc artifacts get` finds versions. Push the tag (and `dvc push` the model) to publish it.
# The Keras model and its exported formats are released together, one tag per artifact.
ARTIFACTS := classifier classifier-onnx classifier-savedmodel
release:
	@echo "$(VERSION)" | grep -Eq '^[0-9]+\.[0-9]+\.[0-9]+$$' || { echo "usage: make release VERSION=x.y.z" >&2; exit 2; }
	for artifact in $(ARTIFACTS); do git tag -a "$$artifact@v$(VERSION)" -m "$$artifact v$(VERSION)" || exit 1; done
	@echo "tagged $(foreach a,$(ARTIFACTS),$(a)@v$(VERSION)); publish with: git push origin --tags && dvc push"

clean:
	rm -rf $(VENV) $(SERVE_VENV) dvc_plots report.md report_images $(VERDICT) .pytest_cache .ruff_cache
