#!/bin/busybox sh
# moru guest init, shutdown: busybox init runs this on SIGUSR2 (power off) and
# SIGTERM (reboot) before it kills every process; flush the disk first.
echo "moru-init: shutting down" >/dev/console
/bin/busybox sync
exit 0
