#!/bin/busybox sh
# moru guest init, system setup: busybox init runs this once (sysinit) before
# starting guestd. Mounts the API filesystems, sets the clock and hostname,
# brings up lo and eth0 from the kernel command line, and grows the root
# filesystem in the background when the disk is bigger than the image.
# Kernel parameters read: moru.hostname=<name>,
# moru.net=<ip>/<prefix>,<gateway>,<dns>, moru.time=<unix seconds>, root=.
#
# Every process costs tens of milliseconds of guest CPU under TCG (fork, page
# faults), so this script starts as few as it can: builtins where they do, one
# `cp -a` for /dev's links and directories, one `mount -a` (/etc/fstab) for
# the API filesystems; busybox applets are called by name (no PATH lookup).
say() { echo "moru-init: $*" >/dev/console; }

# The initramfs moved its devtmpfs here; mount one if it could not.
[ -c /dev/null ] || mount -t devtmpfs -o nosuid,mode=755 devtmpfs /dev
# /dev/pts, /dev/shm (mount points) and /dev/fd, stdin, stdout, stderr (links).
cp -a /opt/moru/init/dev/. /dev/
mount -a || say "mount -a failed: $(cat /proc/mounts 2>&1)"
mkdir /run/lock

# Self-protection (guestd/limits.py): guestd and its loop in moru-agent, every
# command guestd starts in a group of its own below moru-user, whose
# memory.max and pids.max leave room for the agent; the agent also gets 10x
# the CPU weight. A fork bomb or a memory hog then meets its own group's
# limits and OOM killer, not guestd, and the next command still gets CPU.
cg=/sys/fs/cgroup
if echo "+memory +pids +cpu" >$cg/cgroup.subtree_control 2>/dev/null \
    || echo "+memory +pids" >$cg/cgroup.subtree_control; then
    mkdir -p $cg/moru-agent $cg/moru-user
    while read -r key kb _; do [ "$key" = MemTotal: ] && break; done </proc/meminfo
    reserve=$((kb / 8))
    [ "$reserve" -lt 65536 ] && reserve=65536
    echo "$(((kb - reserve) * 1024))" >$cg/moru-user/memory.max
    pids=$((kb / 512))
    [ "$pids" -lt 256 ] && pids=256
    echo "$pids" >$cg/moru-user/pids.max
    [ -e $cg/moru-agent/cpu.weight ] && echo 1000 >$cg/moru-agent/cpu.weight
    # Each command gets a group of its own below moru-user (guestd/limits.py).
    read -r ctl <$cg/cgroup.subtree_control
    for c in $ctl; do echo "+$c" >$cg/moru-user/cgroup.subtree_control; done
else
    say "no cgroup controllers: user processes run without guest-side limits"
fi

hostname=moru
net=
clock=
root=/dev/vda
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        moru.hostname=*) hostname=${arg#moru.hostname=} ;;
        moru.net=*) net=${arg#moru.net=} ;;
        moru.time=*) clock=${arg#moru.time=} ;;
        root=*) root=${arg#root=} ;;
    esac
done

# Clock: the host's time when it is given, else the RTC.
if [ -n "$clock" ]; then
    date -s "@${clock%%.*}" >/dev/null || say "cannot set the clock to $clock"
elif [ -e /dev/rtc0 ]; then
    hwclock -s -u 2>/dev/null
fi

echo "$hostname" >/proc/sys/kernel/hostname
echo "$hostname" >/etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
    "$hostname" >/etc/hosts

ip link set lo up
if [ -n "$net" ]; then
    old_ifs=$IFS
    IFS=,
    set -- $net
    IFS=$old_ifs
    addr=$1 gw=$2 dns=$3
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$i" -lt 200 ]; do i=$((i + 1)); sleep 0.005; done
    if ip addr add "$addr" dev eth0 && ip link set eth0 up; then
        if [ -n "$gw" ]; then
            ip route add default via "$gw" dev eth0 || say "cannot add a route via $gw"
        fi
        [ -n "$dns" ] && echo "nameserver $dns" >/etc/resolv.conf
    else
        say "cannot configure eth0 with $net"
    fi
fi

# Online resize when the sandbox's disk is bigger than the filesystem built into the image.
if [ -b "$root" ] && [ -r /etc/moru/image ]; then
    . /etc/moru/image
    read -r sectors </sys/class/block/"${root#/dev/}"/size
    if [ -n "$MORU_ROOTFS_BYTES" ] && [ "$((sectors * 512))" -gt "$MORU_ROOTFS_BYTES" ]; then
        (/usr/sbin/resize2fs "$root" >/dev/null 2>&1 && say "grew / to $((sectors / 2048)) MiB" \
            || say "resize2fs $root failed") &
    fi
fi
exit 0
