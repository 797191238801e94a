#!/bin/busybox sh
# moru guest init, guestd supervisor: busybox init respawns this script; it
# runs guestd, and when guestd dies says so on the console and starts it
# again (quickly after a long run, with a growing pause if it keeps failing).
# hostd's health check notices a restarted guestd and initialises it again.
# Applets are called by name: this busybox runs them without a PATH lookup.
export HOME=/root
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[ -r /etc/moru/env ] && . /etc/moru/env
port=50051
data_port=50052  # guestd's data listener (bulk file transfers), relayed by hostd
[ -r /etc/moru/image ] && . /etc/moru/image && port=${MORU_GUESTD_PORT:-50051} \
    && data_port=${MORU_GUESTD_DATA_PORT:-50052}
# Self-protection (rc.sh made the groups): this loop and so guestd are exempt
# from the OOM killer and in the agent's cgroup, out of the user processes' way.
echo -1000 >/proc/$$/oom_score_adj
[ -d /sys/fs/cgroup/moru-agent ] && echo $$ >/sys/fs/cgroup/moru-agent/cgroup.procs
delay=0.1
n=0
while :; do
    read -r start _ </proc/uptime
    [ "$n" = 0 ] && echo "moru-init: starting guestd at uptime ${start}s" >/dev/console
    /opt/moru/bin/guestd --listen "vsock:$port" --data-listen "vsock:$data_port" --guest
    rc=$?
    read -r end _ </proc/uptime
    n=$((n + 1))
    if [ "$((${end%%.*} - ${start%%.*}))" -ge 30 ]; then delay=0.1; fi
    echo "moru-init: guestd exited with status $rc; restart $n in ${delay}s" >/dev/console
    sleep "$delay"
    case "$delay" in 0.1) delay=0.5 ;; 0.5) delay=1 ;; 1) delay=2 ;; *) delay=5 ;; esac
done
