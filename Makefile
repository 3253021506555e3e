# confpy: `make demo` shows it working, `make test` proves it. Both set up what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get

.PHONY: all venv nginx browser etcd promtool demo-etcd lua test lint typecheck unit e2e conformance demo bench clean deb deb-tools

all: test

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# nginx from Debian, with the Lua module live mode uses, installed only when something is missing.
# openssl makes the certificates of the TLS tests.
NGINX_PACKAGES := nginx-light libnginx-mod-http-lua lua-resty-core lua-cjson openssl
nginx:
	@missing=$$(for p in $(NGINX_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ] && ! { [ -x /usr/sbin/nginx ] && [ "$$missing" = "nginx-light" ]; }; then \
		echo "installing with apt-get: $$missing"; \
		$(APT) update -qq && $(APT) install -y -qq $$missing >/dev/null; \
	fi

# Install those of the Debian packages $(1) that are missing, with apt-get.
define apt_install_missing
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing with apt-get: $$missing"; \
		$(APT) update -qq && $(APT) install -y -qq $$missing >/dev/null; \
	fi
endef

# etcd as a registry: a real etcd (etcd-server) and etcdctl (etcd-client), installed only when missing.
ETCD_PACKAGES := etcd-server etcd-client
etcd:
	$(call apt_install_missing,$(ETCD_PACKAGES))

# promtool (Debian's prometheus package): the tests check /metrics' exposition format with it,
# installed only when missing.
PROMETHEUS_PACKAGES := prometheus
promtool:
	$(call apt_install_missing,$(PROMETHEUS_PACKAGES))

# The status page's browser tests: Debian's Chromium and its driver (Selenium is pointed at them,
# so nothing is downloaded at run time), installed only when missing.
BROWSER_PACKAGES := chromium chromium-driver
browser:
	$(call apt_install_missing,$(BROWSER_PACKAGES))

lint: venv
	$(BIN)/ruff check confpy tests bench conformance
	$(BIN)/ruff format --check confpy tests bench conformance

typecheck: venv
	$(BIN)/mypy confpy bench

# The in-process tier: no nginx, no apt step, no process and no socket but a socketpair (a guard in
# tests/conftest.py fails a test that tries); seconds. Tests are end-to-end (marker e2e) by fixture.
unit: venv
	$(BIN)/pytest -q -m "not e2e"

# The end-to-end tier: nginx, dev-consul, etcd, Chromium, confpy as a process.
e2e: venv nginx browser etcd
	PATH="$$PATH:/usr/sbin" $(BIN)/pytest -q -m e2e

# py-consul's own test suite against dev-consul (docs/dev-consul.md); fails if fewer pass than before.
CONFORMANCE_FLOOR := 55
conformance: venv
	PATH="$$PATH:/usr/sbin" $(BIN)/python conformance/run.py --min-pass $(CONFORMANCE_FLOOR)

test: venv nginx browser etcd promtool lint typecheck unit e2e conformance

demo: venv nginx
	PATH="$$PATH:/usr/sbin" $(BIN)/confpy demo

demo-etcd: venv nginx etcd
	PATH="$$PATH:/usr/sbin" $(BIN)/confpy demo --registry etcd

bench: venv nginx
	@command -v wrk >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq wrk >/dev/null; }
	PATH="$$PATH:/usr/sbin" $(BIN)/python bench/run.py

# The Debian package, dist/confpy_VERSION_ARCH.deb (docs/operations.md: what it installs, and why a
# virtualenv of pinned wheels). Debian's tools build it in a copy of this tree under build/deb,
# since dpkg-buildpackage writes its results beside the source folder; no .venv is needed.
DEB_BUILD_PACKAGES := dpkg-dev debhelper help2man python3-pip python3-setuptools python3-wheel python3.11
deb:
	$(call apt_install_missing,$(DEB_BUILD_PACKAGES))
	rm -rf build/deb dist/confpy_*.deb && mkdir -p build/deb/confpy dist
	tar -c --exclude-vcs --exclude=./.venv --exclude=./build --exclude=./dist --exclude=__pycache__ \
		--exclude='*.egg-info' --exclude=./.pytest_cache --exclude=./.mypy_cache --exclude=./.ruff_cache \
		--exclude=./.hypothesis . | tar -x -C build/deb/confpy
	cd build/deb/confpy && dpkg-buildpackage --build=binary --no-sign
	cp build/deb/confpy_*.deb dist/
	@ls -l dist/confpy_*.deb

# What tests/test_deb.py checks the package with: lintian, and systemd-analyze for the unit.
DEB_CHECK_PACKAGES := lintian systemd
deb-tools:
	$(call apt_install_missing,$(DEB_CHECK_PACKAGES))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
