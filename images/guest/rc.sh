#!/bin/busybox sh
# moru guest init, system setup: busybox init runs this once (sysinit) before
# starting guestd. Mounts the API filesystems, sets the clock and hostname,
# brings up lo and eth0 from the kernel command line, and grows the root
# filesystem in the background when the disk is bigger than the image.
# Kernel parameters read: moru.hostname=<name>,
# moru.net=<ip>/<prefix>,<gateway>,<dns>, moru.time=<unix seconds>, root=.
#
# Every command here is a busybox applet called by name (this busybox runs
# applets without a PATH lookup or exec): under TCG each exec of a binary
# costs tens of milliseconds, so this script avoids them.
say() { echo "moru-init: $*" >/dev/console; }

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
# The initramfs moved its devtmpfs here; mount one if it could not.
[ -c /dev/null ] || mount -t devtmpfs -o nosuid,mode=755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup || say "cannot mount cgroup2"
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
mkdir /run/lock

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

hostname "$hostname"
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
