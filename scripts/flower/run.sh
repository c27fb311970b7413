#!/usr/bin/env bash
# Coordinator: submit the histofuse app (this repository, [tool.flwr.app] in pyproject.toml) to the SuperLink.
#
#   scripts/flower/run.sh SUPERLINK_HOST:PORT 'federated.strategy="fedadam" federated.rounds=30' [OUT]
#   INSECURE=1 scripts/flower/run.sh 127.0.0.1:9093 'federated.rounds=3 federated.min_sites=3'
#
# The second argument is Flower run config: space-separated SECTION.KEY=VALUE (TOML values: quote strings),
# any key of [tool.flwr.app.config] in pyproject.toml; they override CONFIG's values.
# Adds (or replaces) only the connection [superlink.histofuse] in $FLWR_HOME/config.toml (default ~/.flwr);
# the file's other connections and its default are kept.
# Environment: CA (default certs/ca.crt), CONFIG (a histofuse run config YAML the ServerApp and every
# ClientApp read; must exist at the same path on every machine), RESUME=1 to continue a killed run.
set -euo pipefail
LINK="$1"; SETTINGS="${2:-}"; OUT="${3:-runs/flower}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HOME_DIR="${FLWR_HOME:-$HOME/.flwr}"
mkdir -p "$HOME_DIR"
if [[ "${INSECURE:-0}" == 1 ]]; then TLS='insecure = true'; else TLS="root-certificates = \"$(realpath "${CA:-certs/ca.crt}")\""; fi
python3 - "$HOME_DIR/config.toml" "$LINK" "$TLS" <<'PY'
import re, sys
from pathlib import Path

path, link, tls = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
text = path.read_text() if path.is_file() else ""
# drop an earlier [superlink.histofuse] table (up to the next table header), keep everything else
text = re.sub(r"(?ms)^\[superlink\.histofuse\]\n.*?(?=^\[|\Z)", "", text).rstrip()
if not re.search(r"(?m)^\[superlink\]", text):
    text = '[superlink]\ndefault = "histofuse"\n\n' + text
block = f'[superlink.histofuse]\naddress = "{link}"\n{tls}\n'
tmp = path.with_name(path.name + ".tmp")
tmp.write_text(text.rstrip() + "\n\n" + block)
tmp.replace(path)
PY
resume=false; [[ "${RESUME:-0}" == 1 ]] && resume=true
exec flwr run "$ROOT" histofuse --run-config "$SETTINGS out=\"$(realpath -m "$OUT")\" config=\"${CONFIG:-}\" resume=$resume"
