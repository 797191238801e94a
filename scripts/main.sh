#!/usr/bin/env bash
# Installs everything, builds the base template and runs hostd in the foreground.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
venv=${MORU_VENV:-/opt/moru/venv}
export PATH="$venv/bin:$PATH"
moru-images build base
exec moru-hostd serve "$@"
