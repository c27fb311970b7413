#!/usr/bin/env bash
# Coordinator: start the Flower SuperLink (fleet, control and runtime APIs on one HTTP port).
#
#   scripts/flower/superlink.sh                      # TLS: needs certs/ca.crt, certs/server.pem, certs/server.key
#   INSECURE=1 scripts/flower/superlink.sh           # loopback / trials only: no TLS, no node authentication
#
# Environment: PORT (default 9093), CERTS (default certs), NODE_KEYS (CSV of SuperNode public keys; enables
# SuperNode authentication), FLWR_HOME (state and apps; default ~/.flwr).
set -euo pipefail
PORT="${PORT:-9093}"
CERTS="${CERTS:-certs}"
args=(--port "$PORT" --disable-runtime-dependency-installation)
if [[ "${INSECURE:-0}" == 1 ]]; then
    args+=(--insecure)
else
    args+=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key")
fi
if [[ -n "${NODE_KEYS:-}" ]]; then
    args+=(--enable-supernode-auth --auth-list-public-keys "$NODE_KEYS")
fi
exec flower-superlink "${args[@]}"
