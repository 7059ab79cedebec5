# regfs: install, demo, test, bench, lint, dist. Every target installs what is missing first.
# test and lint check types too: mypy --strict, configured in pyproject.toml.
# install also puts regfs where Linux looks for it (as root, or into DESTDIR): the mount(8)
# helpers /sbin/mount.fuse.regfs and mount.regfs, regfs on PATH, regfs(1), bash completion.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev docker-registry skopeo umoci \
                attr curl openssl apache2-utils rsync vim man-db patch bash-completion
STAMP := $(VENV)/.installed
PREFIX ?= /usr/local
SBINDIR ?= /sbin
MANDIR ?= $(PREFIX)/share/man
COMPLETIONDIR ?= $(PREFIX)/share/bash-completion/completions
REGFS := $(abspath $(BIN))/regfs

.PHONY: install deb system demo test bench lint dist clean

install: deb $(STAMP) system

# Links to the venv's regfs (it knows the helper names it is run by); the man page and the
# completion are generated from the same parser as --help. Not root and no DESTDIR: skipped.
system: $(STAMP)
ifeq ($(if $(DESTDIR),yes,$(filter 0,$(shell id -u))),)
	@echo "not root: regfs, mount.fuse.regfs, regfs(1) and its completion not installed"
else
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(MANDIR)/man1 \
	    $(DESTDIR)$(COMPLETIONDIR)
	ln -sfn $(REGFS) $(DESTDIR)$(PREFIX)/bin/regfs
	ln -sfn $(REGFS) $(DESTDIR)$(SBINDIR)/mount.fuse.regfs
	ln -sfn $(REGFS) $(DESTDIR)$(SBINDIR)/mount.regfs
	$(BIN)/python -m regfs.manpage > $(DESTDIR)$(MANDIR)/man1/regfs.1
	$(BIN)/regfs --print-completion bash > $(DESTDIR)$(COMPLETIONDIR)/regfs
endif

# Install only the Debian packages that are missing (apt-get update once, only if needed).
deb:
	@missing=$$(for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    [ "$$(id -u)" = 0 ] || { echo "need root to install: $$missing" >&2; exit 1; }; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# pyfuse3 is rebuilt with regfs's patch (third_party/pyfuse3/README.md: listings the kernel
# keeps); a stock pyfuse3 works too, without those savings.
$(STAMP): pyproject.toml third_party/pyfuse3/regfs.patch third_party/pyfuse3/install
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	third_party/pyfuse3/install $(VENV)
	touch $@

demo: install
	$(BIN)/python -m regfs.demo

test: install
	$(BIN)/ruff check storage regfs tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider --durations=15

bench: install
	$(BIN)/python -m bench
	$(BIN)/python -m bench.rootfs
	$(BIN)/python -m bench.s3 --size 1G

lint: install
	$(BIN)/ruff check storage regfs tests bench
	$(BIN)/ruff format --check storage regfs tests bench
	$(BIN)/mypy

# An sdist, and a wheel built from it (so the sdist is known to be complete), in dist/.
DISTDIR ?= dist
dist: $(STAMP)
	rm -rf $(DISTDIR)
	$(BIN)/python -m build --outdir $(DISTDIR) .

clean:
	rm -rf $(VENV) build dist *.egg-info
