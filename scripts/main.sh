#!/usr/bin/env bash
# Installs everything, builds the base template and runs hostd in the foreground
# (with a ready snapshot of base and a warm pool of two base sandboxes for fast creates).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
venv=${MORU_VENV:-/opt/moru/venv}
export PATH="$venv/bin:$PATH"
moru-images build base
# Keep a ready snapshot of base, so Creates with its defaults restore it (~0.2x of
# a cold boot) instead of booting; MORU_READY_SNAPSHOT_TEMPLATES= turns it off.
export MORU_READY_SNAPSHOT_TEMPLATES=${MORU_READY_SNAPSHOT_TEMPLATES-base}
# Keep two base sandboxes prepared (refilled from the ready snapshot), so a Create
# with base's defaults is a claim; two suit a 2-core node. MORU_WARM_POOL= turns it off.
export MORU_WARM_POOL=${MORU_WARM_POOL-base=2}
exec moru-hostd serve "$@"
