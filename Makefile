# regfs: install, demo, test, bench, lint. Every target installs what is missing first.
# test and lint check types too: mypy --strict, configured in pyproject.toml.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev docker-registry skopeo umoci \
                attr curl openssl apache2-utils rsync vim
STAMP := $(VENV)/.installed

.PHONY: install deb demo test bench lint clean

install: deb $(STAMP)

# Install only the Debian packages that are missing (apt-get update once, only if needed).
deb:
	@missing=$$(for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    [ "$$(id -u)" = 0 ] || { echo "need root to install: $$missing" >&2; exit 1; }; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/python -m regfs.demo

test: install
	$(BIN)/ruff check storage regfs tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

bench: install
	$(BIN)/python -m bench

lint: install
	$(BIN)/ruff check storage regfs tests bench
	$(BIN)/ruff format --check storage regfs tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
