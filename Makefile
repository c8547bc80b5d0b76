# The README's two commands: `make demo` and `make test`. Both install what
# they need (the wasm32-wasip2 target) and build the guests once, in release
# mode, into guests/target; the host tests and the demo reuse them.

SHELL := /bin/bash
CARGO ?= cargo
GUEST_TARGET := wasm32-wasip2
GUESTS := guests/target/$(GUEST_TARGET)/release
STATE := .cordon-state
CORDON := target/debug/cordon

.PHONY: demo demo-tools test lint bench guests toolchain host clean

# Debian packages the build and the tests need: protoc (the etcd client's
# gRPC code is generated at build time), etcd (the migration tests and
# benchmark start their own servers on loopback ports), and for the OCI
# tests and benchmark a registry (CNCF distribution), skopeo as an
# independent client and htpasswd for a registry that needs a login, and
# PostgreSQL 15 for the many-agent tests (each starts its own cluster), and
# wrk, the HTTP load generator of the server benchmark.
APT_PACKAGES := protobuf-compiler:protoc etcd-server:etcd docker-registry:docker-registry skopeo:skopeo apache2-utils:htpasswd \
	postgresql-15:/usr/lib/postgresql/15/bin/initdb wrk:wrk

toolchain:
	@rustup target list --installed | grep -qx '$(GUEST_TARGET)' || rustup target add $(GUEST_TARGET)
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@missing=""; for p in $(APT_PACKAGES); do command -v $${p#*:} >/dev/null || missing="$$missing $${p%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The first-party plugins, each under its own name (`http-check.wasm`), in
# the one directory an operator copies plugins from; the test suite's
# purpose-built and hostile guests stay in guests/target only.
PLUGINS := dist/plugins
FIRST_PARTY := wait approval http-check files kcp-keys registry-rewrite \
	migrate-prepare migrate-copy migrate-verify migrate-cleanup migrate-finalize

guests: toolchain
	cd guests && $(CARGO) build --release --target $(GUEST_TARGET)
	$(MAKE) --no-print-directory $(GUESTS)/wait_py.wasm
	@mkdir -p $(PLUGINS)
	@for p in $(FIRST_PARTY); do cp $(GUESTS)/$$(echo $$p | tr - _).wasm $(PLUGINS)/$$p.wasm; done
	@cp $(GUESTS)/wait_py.wasm $(PLUGINS)/wait-py.wasm

# The Python twin of WAIT, built with componentize-py (from PyPI) in a venv.
PYENV := guests/target/python
COMPONENTIZE_PY := componentize-py==0.25.1

$(PYENV)/bin/componentize-py:
	@python3 -m venv --help >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq python3-venv)
	python3 -m venv $(PYENV)
	$(PYENV)/bin/pip install -q $(COMPONENTIZE_PY)

$(GUESTS)/wait_py.wasm: guests/python/wait-py/app.py $(wildcard wit/*.wit) $(PYENV)/bin/componentize-py
	@mkdir -p $(GUESTS)
	cd guests/python/wait-py && ../../../$(PYENV)/bin/componentize-py -d ../../../wit -w executor componentize app -o ../../../$@.tmp
	mv $@.tmp $@

host: toolchain
	$(CARGO) build -p cordon

# Clippy with warnings as errors, on the host workspace (every target) and
# on the guests as they are built (wasm32-wasip2, release).
lint: toolchain
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd guests && $(CARGO) clippy --release --target $(GUEST_TARGET) --workspace -- -D warnings

# The SDK's own tests and doc examples run natively: wit-bindgen's bindings
# compile on any target, so every example in the SDK docs is built. Its
# bindings are checked against wit/ (sdk/tests/bindings.rs), its docs must
# build without warnings, and `cargo package` must build both SDK crates
# from their packaged files alone, as crates.io would.
# The pipeline end-to-end tests run three times: on the embedded SQLite
# state, on PostgreSQL (CORDON_TEST_STATE=postgres: each test world gets a
# fresh database of a throwaway cluster), and through two `cordon server`
# replicas on such a database (CORDON_TEST_STATE=server: people and agents
# with their own tokens; one test kills a replica mid-deployment).
PIPELINE_TESTS := --test pipeline --test debug --test plugins --test cli

test: guests host lint
	$(CARGO) test --workspace
	CORDON_TEST_STATE=postgres $(CARGO) test -p cordon-tests $(PIPELINE_TESTS)
	CORDON_TEST_STATE=server $(CARGO) test -p cordon-tests $(PIPELINE_TESTS)
	cd guests && $(CARGO) test -p cordon-sdk -p cordon-sdk-deployment
	cd guests && RUSTDOCFLAGS="-D warnings" $(CARGO) doc -q -p cordon-sdk -p cordon-sdk-deployment --no-deps
	cd guests && $(CARGO) package -q --allow-dirty -p cordon-sdk -p cordon-sdk-deployment

bench: guests host
	$(CARGO) bench -p cordon-tests

# The demo needs python3 for its loopback web servers.
demo-tools:
	@command -v python3 >/dev/null || (apt-get update -qq && apt-get install -y -qq python3)

demo: guests host demo-tools
	examples/demo.sh

clean:
	rm -rf $(STATE) dist
