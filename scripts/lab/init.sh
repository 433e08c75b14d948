#!/bin/busybox sh
# /init of the lab's L1 VM (built into its initramfs by scripts/lab.sh).
#
# Loads what forkd needs (kvm_amd, tun, vhost_vsock, ...), builds a writable copy of the host's
# root (9p, read-only, under a tmpfs overlay), mounts the scratch disk (TMPDIR) and the shared
# directory at its host path, runs the host's command in a chroot of that root, writes its exit
# status to the shared directory and powers L1 off. Anything that goes wrong is one line in
# the shared directory's init-error, which scripts/lab.sh reports.
/bin/busybox mkdir -p /bin /proc /sys /dev /share /lower /rw /root
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "lab-init: $*" >/dev/ttyS0; }
fail() {
    say "$*"
    [ -w /share ] && echo "$*" >/share/init-error
    sync
    poweroff -f
}
load() {
    for m in "$@"; do
        modprobe "$m" 2>/dev/ttyS0 || [ -d "/sys/module/$m" ] || fail "modprobe $m failed"
    done
}

# The shared directory first, so later failures can be reported through it.
load virtio_pci 9pnet_virtio 9p
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,access=any labshare /share \
    || fail "cannot mount the shared directory (9p tag labshare)"
. /share/lab.env || fail "the shared directory has no lab.env"
# A heartbeat scripts/lab.sh watches: when it stops, L1 has wedged and the host stops QEMU.
( while :; do date +%s >/share/heartbeat; sleep 5; done ) &
heartbeat=$!

grep -qw svm /proc/cpuinfo || fail "the emulated CPU has no svm flag: QEMU's TCG did not give L1 AMD-V"
load $(cat /etc/lab-modules)
[ -c /dev/kvm ] || fail "kvm_amd loaded but /dev/kvm did not appear"

mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower \
    || fail "cannot mount the host's root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /root \
    || fail "cannot build the overlay root"
mount -t proc proc /root/proc
mount -t sysfs sysfs /root/sys
mount -t devtmpfs devtmpfs /root/dev
mkdir -p /root/dev/pts /root/dev/shm
# What udev would add: bash's process substitution needs /dev/fd.
ln -sf /proc/self/fd /root/dev/fd
ln -sf /proc/self/fd/0 /root/dev/stdin
ln -sf /proc/self/fd/1 /root/dev/stdout
ln -sf /proc/self/fd/2 /root/dev/stderr
mount -t devpts -o newinstance,ptmxmode=0666 devpts /root/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /root/dev/shm
mount -t tmpfs -o mode=0755 tmpfs /root/run
mount -t cgroup2 cgroup2 /root/sys/fs/cgroup || fail "cannot mount cgroup2"
# Test data (snapshots, overlays) on the scratch disk, not in L1's RAM: TMPDIR points there.
# /tmp itself stays the host's (a checkout or a shared directory may live under it).
mkdir -p "/root$LAB_SCRATCH"
mount -t ext4 /dev/vda "/root$LAB_SCRATCH" || fail "cannot mount the scratch disk on $LAB_SCRATCH"
chmod 1777 "/root$LAB_SCRATCH"
mkdir -p "/root$LAB_SHARE"
mount -o bind /share "/root$LAB_SHARE"
ip link set lo up
hostname forkd-lab

# The command's stdout and stderr reach the host on ttyS1 and ttyS2, through pipes: what it
# runs must not believe it has a terminal (no colours, no progress bars), as under CI.
for tty in /dev/ttyS1 /dev/ttyS2; do stty -F "$tty" raw -echo; done
mkfifo /cmd-out /cmd-err
cat /cmd-out >/dev/ttyS1 &
cat /cmd-err >/dev/ttyS2 &
echo "lab: L1 ready after $(cut -d' ' -f1 /proc/uptime) s; running the command" >/dev/ttyS2
chroot /root /bin/bash "$LAB_SHARE/cmd.sh" </dev/null >/cmd-out 2>/cmd-err
echo "$?" >/share/status
kill "$heartbeat"
wait
sync
poweroff -f
