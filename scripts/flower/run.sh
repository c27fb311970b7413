#!/usr/bin/env bash
# Coordinator: submit the histofuse app (this repository, [tool.flwr.app] in pyproject.toml) to the SuperLink.
#
#   scripts/flower/run.sh SUPERLINK_HOST:PORT "federated.strategy=fedadam;federated.rounds=30" [OUT]
#   INSECURE=1 scripts/flower/run.sh 127.0.0.1:9093 "federated.rounds=3;federated.min_sites=3"
#
# Writes the connection "histofuse" into $FLWR_HOME/config.toml (default ~/.flwr), then `flwr run`.
# Environment: CA (default certs/ca.crt), CONFIG (a histofuse run config YAML the ServerApp and every
# ClientApp read; must exist at the same path on every machine), RESUME=1 to continue a killed run.
set -euo pipefail
LINK="$1"; OVERRIDES="${2:-}"; OUT="${3:-runs/flower}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HOME_DIR="${FLWR_HOME:-$HOME/.flwr}"
mkdir -p "$HOME_DIR"
{
    echo '[superlink]'
    echo 'default = "histofuse"'
    echo
    echo '[superlink.histofuse]'
    echo "address = \"$LINK\""
    if [[ "${INSECURE:-0}" == 1 ]]; then echo 'insecure = true'; else echo "root-certificates = \"$(realpath "${CA:-certs/ca.crt}")\""; fi
} > "$HOME_DIR/config.toml"
resume=false; [[ "${RESUME:-0}" == 1 ]] && resume=true
exec flwr run "$ROOT" histofuse --run-config "overrides='$OVERRIDES' out='$(realpath -m "$OUT")' config='${CONFIG:-}' resume=$resume"
