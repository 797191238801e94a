#!/usr/bin/env bash
# Installs everything, builds the images the tests boot, and runs the test
# suite: pytest (arguments go to it), then the JS SDK's build and tests
# (js/, `npm test`). Fails when either fails; both results are printed last.
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
(cd js && MORU_VENV="$venv" npm test)
js_rc=$?
set -e
echo "[test] pytest: exit $rc; js (npm test in js/): exit $js_rc"
# pytest's 5 means no test ran: that is a failure of the suite, not a pass.
[ "$rc" -ne 0 ] && exit "$rc"
exit "$js_rc"
