#!/usr/bin/env bash
# One hospital: start a Flower SuperNode for SITE, reading its own cohort spec (patients never leave).
#
#   scripts/flower/supernode.sh SITE COHORT.yaml SUPERLINK_HOST:PORT
#   INSECURE=1 scripts/flower/supernode.sh north cohorts/north.yaml 127.0.0.1:9093
#
# Environment: CLIENTAPP_PORT (default 9094, must be free on this machine), CA (the coordinator's CA
# certificate, default certs/ca.crt), NODE_KEY (this node's private key; its public key NODE_KEY.pub must be
# in the SuperLink's list when node authentication is on), OUT (folder holding extracted features, if the
# cohort has slides: the same --out used with `histofuse extract`).
set -euo pipefail
SITE="$1"; COHORT="$2"; LINK="$3"
args=(--superlink "$LINK" --port "${CLIENTAPP_PORT:-9094}"
      --node-config "site='$SITE' cohort='$(realpath "$COHORT")' out='${OUT:-runs/latest}'")
if [[ "${INSECURE:-0}" == 1 ]]; then
    args+=(--insecure)
else
    args+=(--root-certificates "${CA:-certs/ca.crt}")
fi
if [[ -n "${NODE_KEY:-}" ]]; then
    args+=(--auth-supernode-private-key "$NODE_KEY" --auth-supernode-public-key "$NODE_KEY.pub")
fi
exec flower-supernode "${args[@]}"
