#!/bin/busybox sh
# moru initramfs /init: load the virtio and vsock modules in dependency order,
# mount the root disk (ext4 on virtio-blk) and switch_root into the guest init.
# Kernel parameters read: root= (default /dev/vda), rootfstype=, ro/rw,
# moru.init= (default /opt/moru/bin/init).
export PATH=/bin

fail() {
    echo "moru-initramfs: $*; halting" >/dev/console
    # PID 1 exiting panics the kernel; with panic=-1 the VM resets (QEMU -no-reboot exits).
    exit 1
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"

root=/dev/vda
fstype=ext4
mode=rw
init=/opt/moru/bin/init
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        root=*) root=${arg#root=} ;;
        rootfstype=*) fstype=${arg#rootfstype=} ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
        moru.init=*) init=${arg#moru.init=} ;;
    esac
done

while read -r mod; do
    insmod "/lib/modules/$mod" || echo "moru-initramfs: insmod $mod failed" >/dev/console
done </etc/moru-modules

# virtio-blk probes as its module loads; allow a little slack, polling with a bound.
i=0
while [ ! -b "$root" ]; do
    i=$((i + 1))
    [ "$i" -gt 1000 ] && fail "root device $root did not appear"
    sleep 0.005
done

mount -t "$fstype" -o "$mode" "$root" /newroot || fail "cannot mount $root ($fstype, $mode)"
[ -x "/newroot$init" ] || [ -L "/newroot$init" ] || fail "no guest init $init on $root"
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /sys
umount /proc
exec switch_root /newroot "$init"
