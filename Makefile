# The README's two commands: `make demo` and `make test`. Both install what
# they need (the wasm32-wasip2 target) and build the guests once, in release
# mode, into guests/target; the host tests and the demo reuse them.

SHELL := /bin/bash
CARGO ?= cargo
GUEST_TARGET := wasm32-wasip2
GUESTS := guests/target/$(GUEST_TARGET)/release
STATE := .cordon-state
CORDON := target/debug/cordon

.PHONY: demo test bench guests toolchain host clean

toolchain:
	@rustup target list --installed | grep -qx '$(GUEST_TARGET)' || rustup target add $(GUEST_TARGET)

guests: toolchain
	cd guests && $(CARGO) build --release --target $(GUEST_TARGET)

host:
	$(CARGO) build -p cordon

test: guests host
	$(CARGO) test --workspace

bench: guests
	$(CARGO) bench -p cordon --bench runtime --bench pipeline --bench keys

# Writes an agent config pinning the digests of the freshly built guests.
$(STATE)/agent.yaml: examples/agent.yaml guests
	@mkdir -p $(STATE)
	@sed -e "s|@ROOT@|$(CURDIR)|g" \
	     -e "s|@WAIT_SHA256@|$$(sha256sum $(GUESTS)/wait.wasm | cut -d' ' -f1)|" \
	     examples/agent.yaml > $@.tmp && mv $@.tmp $@

demo: guests host $(STATE)/agent.yaml
	$(CORDON) plugin inspect $(GUESTS)/wait.wasm
	$(CORDON) --config $(STATE)/agent.yaml stage run --plugin wait --stage WAIT --with '{"duration": 1}'
	$(CORDON) --config $(STATE)/agent.yaml deploy examples/site --message "demo: deploy the example site"
	$(CORDON) --config $(STATE)/agent.yaml status

clean:
	rm -rf $(STATE)
