# peftserve developer entry points. Every target installs what it needs first, idempotently.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
PROTO_OUT := client/generated
PROTOS := $(wildcard protos/peftserve/v1/*.proto)
PYTEST_ARGS ?=

.PHONY: install serve serve-ray test check lint typecheck manifests protos bench soak clean

install: $(STAMP)

# scripts/install.sh puts torch==2.13.0 in first and alone (here the local CPU wheel); the
# container image (deploy/kubernetes/Containerfile) installs with the same script.
$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) sh scripts/install.sh $(VENV) server,dev,bench,ray
	touch $@

$(NPM_STAMP): package.json examples/node/package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	npm ci --prefix examples/node --no-audit --no-fund --loglevel=error
	touch $@

serve: $(STAMP)
	$(PY) -m peftserve.server $(ARGS)

# peftserve on Ray Serve: a local Ray head on 127.0.0.1, serve_ray/serve_config.yaml deployed,
# the gRPC address printed; Ctrl-C drains and stops it (docs/deploy.md, "Ray Serve").
serve-ray: $(STAMP)
	$(PY) -m peftserve.ray $(ARGS)

test: $(STAMP) $(NPM_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

protos: $(STAMP)
	$(PY) scripts/gen_protos.py --out $(PROTO_OUT)

lint: $(STAMP) $(NPM_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	cd protos && npx --no-install buf lint
	cd protos && npx --no-install buf breaking --against releases/peftserve-v1.0.0.binpb

# mypy cannot follow setuptools' package-dir remapping of an editable install, so it checks a
# link tree that mirrors the installed package layout.
typecheck: $(STAMP)
	$(PY) scripts/typecheck_tree.py .typecheck
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p peftserve.client -p peftserve.server -p peftserve.ray

# Render every overlay of deploy/kubernetes and validate it offline (needs kubectl).
manifests: $(STAMP)
	$(PY) scripts/validate_manifests.py

check: lint typecheck manifests

bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)

# A bounded soak on 127.0.0.1: 5000 mixed requests with random cancels and deadlines.
soak: $(STAMP)
	$(PY) -m tests.reliability.soak --requests 5000

clean:
	rm -rf $(VENV) node_modules .typecheck build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
