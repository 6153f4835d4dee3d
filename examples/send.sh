#!/usr/bin/env bash
# Signs an example webhook with the local profile's hash key and posts it to a running forwarder.
#   examples/send.sh examples/line-item-create.json [http://127.0.0.1:8080]
set -euo pipefail
file=${1:?usage: examples/send.sh FILE [BASE_URL]}
base=${2:-http://127.0.0.1:8080}
key=${HASH_KEY:-local-dev-hash-key}
bin=${FORWARDER_BIN:-target/release/ordercloud-cdp-forwarder}
[ -x "$bin" ] || bin=target/debug/ordercloud-cdp-forwarder
# The key goes through the environment, not the command line (visible in ps).
hash=$(FORWARDER_SIGN_KEY="$key" "$bin" sign "$file")
curl -sS -w '\nHTTP %{http_code}\n' -H 'Content-Type: application/json' -H "X-oc-hash: $hash" \
  --data-binary @"$file" "$base/webhooks/ordercloud"
