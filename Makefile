# confpy: `make demo` shows it working, `make test` proves it. Both set up what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get

.PHONY: all venv nginx browser etcd demo-etcd lua test lint typecheck unit e2e conformance demo bench clean

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

test: venv nginx browser etcd lint typecheck unit e2e conformance

demo: venv nginx
	PATH="$$PATH:/usr/sbin" $(BIN)/confpy demo

demo-etcd: venv nginx etcd
	PATH="$$PATH:/usr/sbin" $(BIN)/confpy demo --registry etcd

bench: venv nginx
	@command -v wrk >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq wrk >/dev/null; }
	PATH="$$PATH:/usr/sbin" $(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
