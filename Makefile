# The README's two commands: `make demo` and `make test`. Each works alone on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch; it lies on local disk on the project's machines, so this is quick there.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-all bench lint install install-test install-bench clean distributed-demo

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# Install torch only when none is importable, so an existing (e.g. CUDA) torch is kept.
.torch-stamp: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	@touch $@

install: .torch-stamp
	$(PIP) install --quiet -e .

# Reference packages the test suite compares against. kronfluence pins packages we must not
# let pip resolve (kronfluence lists torchvision, which would pull a CUDA torch), so they are installed
# without dependencies; their real dependencies are in the test extra.
REFERENCE_PACKAGES ?= kronfluence==1.0.1 singd==0.0.5

install-test: .torch-stamp
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps $(REFERENCE_PACKAGES)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > .torch-constraint.txt && $(PIP) install --quiet -c .torch-constraint.txt -e ".[integrations]"

install-bench: .torch-stamp
	$(PIP) install --quiet -e ".[bench]"

# The main job: the quick benchmark race (< 3 minutes on 2 CPU cores).
demo: install-bench
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.race --quick

# The README's torchrun example: 2 CPU ranks (gloo), restarts by itself after a lost rank.
distributed-demo: install-bench
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=2 --max-restarts=3 \
		-m benchmarks.train_distributed --optimizer Shampoo --steps 200 \
		--checkpoint-dir ckpt/shampoo --checkpoint-every 50

# The whole default test suite (slow benchmark-like checks are left to `make test-all`).
test: install-test
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install-test
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: install-bench
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.race
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.step_time

lint: install-test
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check secondorder tests benchmarks

clean:
	rm -rf $(VENV) .torch-stamp .torch-constraint.txt *.egg-info
