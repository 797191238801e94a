#!/bin/busybox sh
# moru guest init, system setup: busybox init runs this once (sysinit) before
# starting guestd. Mounts the API filesystems, sets the clock and hostname,
# brings up lo and eth0 from the kernel command line, and grows the root
# filesystem in the background when the disk is bigger than the image.
# Kernel parameters read: moru.hostname=<name>,
# moru.net=<ip>/<prefix>,<gateway>,<dns>, moru.time=<unix seconds>, root=.
bb=/bin/busybox
say() { echo "moru-init: $*" >/dev/console; }

mnt() { # mnt TYPE DIR OPTIONS: mount unless already mounted
    $bb grep -q " $2 " /proc/mounts 2>/dev/null && return 0
    $bb mkdir -p "$2"
    $bb mount -t "$1" -o "$3" "$1" "$2" || say "cannot mount $1 on $2"
}

$bb mount -t proc -o nosuid,nodev,noexec proc /proc 2>/dev/null
mnt sysfs /sys nosuid,nodev,noexec
mnt devtmpfs /dev nosuid,mode=755
mnt devpts /dev/pts nosuid,noexec,gid=5,mode=620,ptmxmode=666
mnt tmpfs /dev/shm nosuid,nodev,mode=1777
mnt tmpfs /run nosuid,nodev,mode=755
mnt tmpfs /tmp nosuid,nodev,mode=1777
mnt cgroup2 /sys/fs/cgroup nosuid,nodev,noexec
[ -e /dev/fd ] || $bb ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || $bb ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || $bb ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || $bb ln -s /proc/self/fd/2 /dev/stderr
$bb mkdir -p /run/lock

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

# Clock: the RTC first, then the host's time when it is given and later.
[ -e /dev/rtc0 ] && $bb hwclock -s -u 2>/dev/null
if [ -n "$clock" ] && [ "$($bb date +%s)" -lt "${clock%%.*}" ]; then
    $bb date -s "@${clock%%.*}" >/dev/null || say "cannot set the clock to $clock"
fi

$bb hostname "$hostname"
echo "$hostname" >/etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
    "$hostname" >/etc/hosts

$bb ip link set lo up
if [ -n "$net" ]; then
    old_ifs=$IFS
    IFS=,
    set -- $net
    IFS=$old_ifs
    addr=$1 gw=$2 dns=$3
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$i" -lt 200 ]; do i=$((i + 1)); $bb sleep 0.005; done
    if $bb ip link set eth0 up && $bb ip addr add "$addr" dev eth0; then
        if [ -n "$gw" ]; then
            $bb ip route add default via "$gw" dev eth0 || say "cannot add a route via $gw"
        fi
        [ -n "$dns" ] && echo "nameserver $dns" >/etc/resolv.conf
    else
        say "cannot configure eth0 with $net"
    fi
fi

# Online resize when the sandbox's disk is bigger than the filesystem built into the image.
if [ -b "$root" ] && [ -r /etc/moru/image ]; then
    . /etc/moru/image
    dev=${root#/dev/}
    read -r sectors </sys/class/block/"$dev"/size
    if [ -n "$MORU_ROOTFS_BYTES" ] && [ "$((sectors * 512))" -gt "$MORU_ROOTFS_BYTES" ]; then
        (resize2fs "$root" >/dev/null 2>&1 && say "grew / to $((sectors / 2048)) MiB" \
            || say "resize2fs $root failed") &
    fi
fi
exit 0
