#!/usr/bin/env bash
# `make demo`: deploys examples/site twice through a `cordon agent`, on
# loopback only, and leaves nothing running.
#
# 1. Version 1 goes to a canary directory, HTTP_CHECK checks what the canary
#    serves, then it is promoted to the primary directory and the canary is
#    emptied.
# 2. Version 2 has a broken page: the canary check fails and the automatic
#    rollback restores the previous site, which is then shown being served.
#
# The agent runs a signed setup: it requires a signature on every plugin and
# trusts one key, made here; the first-party plugins from dist/plugins are
# copied and signed with it, as an operator signs the builds they run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=$ROOT/.cordon-state/demo
CORDON=$ROOT/target/debug/cordon
DIST=$ROOT/dist/plugins

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
fetch() { python3 - "$1" <<'PY'
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())
except urllib.error.HTTPError as e:
    print(f"HTTP {e.code}")
PY
}
sha() { sha256sum "$1" | cut -d' ' -f1; }

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

rm -rf "$STATE"
mkdir -p "$STATE/www/primary" "$STATE/www/canary" "$STATE/apps" "$STATE/plugins"
PLUGINS=$STATE/plugins
"$CORDON" plugin keygen "$STATE/demo-key" >/dev/null
for p in files http-check wait approval; do
  cp "$DIST/$p.wasm" "$PLUGINS/"
  "$CORDON" plugin sign "$PLUGINS/$p.wasm" --key "$STATE/demo-key" >/dev/null
done
PRIMARY=$(free_port)
CANARY=$(free_port)
python3 -m http.server --bind 127.0.0.1 --directory "$STATE/www/primary/current" "$PRIMARY" >/dev/null 2>&1 & PIDS+=($!)
python3 -m http.server --bind 127.0.0.1 --directory "$STATE/www/canary/current" "$CANARY" >/dev/null 2>&1 & PIDS+=($!)

cat > "$STATE/agent.yaml" <<YAML
state-dir: $STATE/state
trusted-keys:
  demo: "$(cat "$STATE/demo-key.pub")"
require-signatures: true
plugins:
  - name: files
    path: $PLUGINS/files.wasm
    sha256: $(sha "$PLUGINS/files.wasm")
    world: deployment
    grants:
      mounts:
        - { host: $STATE/www/primary, guest: /www, access: read-write }
        - { host: $STATE/www/canary, guest: /canary, access: read-write }
  - name: http-check
    path: $PLUGINS/http-check.wasm
    sha256: $(sha "$PLUGINS/http-check.wasm")
    world: executor
    grants:
      network: { allow: ["http://127.0.0.1:$PRIMARY", "http://127.0.0.1:$CANARY"] }
    limits: { timeout: 2m }
  - name: wait
    path: $PLUGINS/wait.wasm
    sha256: $(sha "$PLUGINS/wait.wasm")
    world: executor
  - name: approval
    path: $PLUGINS/approval.wasm
    sha256: $(sha "$PLUGINS/approval.wasm")
    world: executor
YAML

# The application directories, with the canary's real port.
for v in site site-v2; do
  cp -r "$ROOT/examples/$v" "$STATE/apps/$v"
  sed -i "s/127.0.0.1:18081/127.0.0.1:$CANARY/" "$STATE/apps/$v/app.cordon.yaml"
done

export CORDON_CONFIG=$STATE/agent.yaml
"$CORDON" agent > "$STATE/agent.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do
  grep -q "agent serving" "$STATE/agent.log" 2>/dev/null && break
  kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$STATE/agent.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "agent serving" "$STATE/agent.log" || { echo "the agent did not start" >&2; cat "$STATE/agent.log" >&2; exit 1; }

echo "== the agent requires signatures and trusts one key, demo:"
for p in files http-check wait approval; do echo "   $("$CORDON" plugin verify "$PLUGINS/$p.wasm")"; done
echo "== primary http://127.0.0.1:$PRIMARY/  canary http://127.0.0.1:$CANARY/"
echo "== deployment 1: version 1 through the canary"
"$CORDON" deploy "$STATE/apps/site" --message "site 1.0.0"
echo "== primary now serves: $(fetch "http://127.0.0.1:$PRIMARY/index.html" | grep -o '<h1>.*</h1>')"

echo "== deployment 2: version 2 has a broken page"
if "$CORDON" deploy "$STATE/apps/site-v2" --message "site 2.0.0"; then
  echo "!! the broken version was not caught" >&2
  exit 1
fi
echo "== after the automatic rollback:"
echo "   primary serves: $(fetch "http://127.0.0.1:$PRIMARY/index.html" | grep -o '<h1>.*</h1>')"
echo "   canary serves:  $(fetch "http://127.0.0.1:$CANARY/index.html")"
"$CORDON" status
