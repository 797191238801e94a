#!/usr/bin/env bash
# Installs everything, builds the images the tests boot, and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
venv=${MORU_VENV:-/opt/moru/venv}
export PATH="$venv/bin:$PATH"
if [ -f images/cli.py ]; then
  moru-images build base python
fi
set +e
"$venv/bin/python" -m pytest "$@"
rc=$?
set -e
# pytest's 5 means no test ran: that is a failure of the suite, not a pass.
exit $rc
