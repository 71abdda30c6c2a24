#!/bin/sh
# nubis testbed agent: the init of the nested test host (L1), a busybox sh script.
#
# It loads the modules listed in /etc/nubis/modules (kvm, kvm-amd, 9p over virtio, tun; in
# modules.dep order), mounts this machine's root file system (9p tag "host", read-only) at /host
# with proc, sys, dev, a tmpfs /tmp and /run inside it, mounts the writable work share (tag
# "work") and the control share (tag "ctl") inside /host at the absolute paths they have on the
# machine, then serves jobs from the control share until asked to shut down.
#
# Kernel command line: nubis.work=<base64 path> nubis.ctl=<base64 path>.
#
# Job protocol (all files in the control share, written by the machine, read here):
#   jobs/<id>/cmd.sh    the shell script to run, chrooted into /host
#   jobs/<id>/timeout   whole seconds after which the job's process group is killed
#   jobs/<id>/go        written last: the job is complete and may start
# and written here:
#   jobs/<id>/started   the job was picked up
#   jobs/<id>/output    the job's standard output and error, as they are produced
#   jobs/<id>/timedout  the job ran out of time and was killed
#   jobs/<id>/status    its exit status (written to status.tmp, then renamed)
# Once the machine has read a job's status it moves the job's directory to done/<id>.
# A file "shutdown" in the control share makes the agent sync and power L1 off. "ready" is
# written once L1 serves jobs; it holds "kvm=yes" or "kvm=missing". "heartbeat" holds a count
# the agent raises about every two seconds while L1 runs: the machine's sign that L1 is alive.
#
# Console markers: NUBIS-L1-USERSPACE, NUBIS-L1-MODULE-FAILED=<path>, NUBIS-L1-READY,
# NUBIS-L1-ERROR=<what>, NUBIS-L1-POWEROFF.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

if [ "$1" = "--run-job" ]; then
    # Runs one job; this process leads its own session (started through setsid).
    d=$2
    t=$(cat "$d/timeout")
    exec 2>/dev/null
    setsid chroot /host /bin/sh "${d#/host}/cmd.sh" >"$d/output" 2>&1 </dev/null &
    job=$!
    (
        sleep "$t"
        : >"$d/timedout"
        kill -9 -- "-$job" 2>/dev/null
    ) &
    watchdog=$!
    wait "$job"
    status=$?
    kill -9 "$watchdog" 2>/dev/null
    kill -9 -- "-$job" 2>/dev/null
    wait 2>/dev/null
    echo "$status" >"$d/status.tmp"
    mv "$d/status.tmp" "$d/status"
    exit 0
fi

say() { echo "$1" >/dev/console; }
fail() {
    say "NUBIS-L1-ERROR=$1"
    sync
    poweroff -f
}

say "NUBIS-L1-USERSPACE"
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys

release=$(uname -r)
while read -r module; do
    [ -n "$module" ] || continue
    insmod "/lib/modules/$release/$module" 2>/dev/null || say "NUBIS-L1-MODULE-FAILED=$module"
done </etc/nubis/modules

work=""
ctl=""
keep=""
set -f
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        nubis.work=*) work=$(echo "${arg#nubis.work=}" | base64 -d) ;;
        nubis.ctl=*) ctl=$(echo "${arg#nubis.ctl=}" | base64 -d) ;;
        nubis.keep=*) keep="$keep $(echo "${arg#nubis.keep=}" | base64 -d)" ;;
    esac
done
set +f
[ -n "$work" ] && [ -n "$ctl" ] || fail "missing-nubis.work-or-nubis.ctl"

opts=trans=virtio,version=9p2000.L,msize=262144
mkdir -p /host
# The host's root is read-only here and does not change under a session's feet, so L1 may
# cache it (cache=loose): without that every stat and read of Python's modules or QEMU's
# libraries is a 9p round trip under TCG, and starting Python costs tens of seconds.
mount -t 9p -o "$opts,ro,cache=loose" host /host || fail "mount-host-share"
mount -t proc proc /host/proc || fail "mount-proc"
mount -t sysfs sysfs /host/sys || fail "mount-sys"
mount -t devtmpfs devtmpfs /host/dev || fail "mount-dev"
mount -t devpts devpts /host/dev/pts 2>/dev/null
mount -t tmpfs tmpfs /host/dev/shm 2>/dev/null
# The host's /tmp is hidden by a fresh tmpfs, except the directories named by nubis.keep
# (a nubis checkout or virtual environment under /tmp), bound back from the host share.
mkdir -p /hosttmp
mount --bind /host/tmp /hosttmp || fail "bind-host-tmp"
mount -t tmpfs -o mode=1777 tmpfs /host/tmp || fail "mount-tmp"
for dir in $keep; do
    mkdir -p "/host$dir" && mount --bind "/hosttmp/${dir#/tmp/}" "/host$dir" || fail "keep-$dir"
done
mount -t tmpfs -o mode=0755 tmpfs /host/run 2>/dev/null
mount -t 9p -o "$opts" work "/host$work" || fail "mount-work-share"
mount -t 9p -o "$opts" ctl "/host$ctl" || fail "mount-ctl-share"
ip link set lo up 2>/dev/null

C="/host$ctl"
if [ -e /dev/kvm ]; then kvm=yes; else kvm=missing; fi
echo "kvm=$kvm" >"$C/ready.tmp"
mv "$C/ready.tmp" "$C/ready"
say "NUBIS-L1-READY kvm=$kvm"

# The heartbeat has a loop of its own: the job loop's pass grows with the number of jobs.
(
    beat=0
    while [ ! -e "$C/shutdown" ]; do
        beat=$((beat + 1))
        echo "$beat" >"$C/heartbeat"
        sleep 2
    done
) &

while [ ! -e "$C/shutdown" ]; do
    for go in "$C"/jobs/*/go; do
        [ -e "$go" ] || continue
        d=${go%/go}
        [ -e "$d/started" ] && continue
        # The host moves a finished job to done/, maybe between the test above and this line.
        # A failed redirection on ":" (a special built-in) would end this shell, which is
        # init: the subshell keeps that failure to itself, and the job is skipped.
        (: >"$d/started") 2>/dev/null || continue
        setsid /init --run-job "$d" &
    done
    usleep 100000
done
umount "/host$work" 2>/dev/null
sync
say "NUBIS-L1-POWEROFF"
poweroff -f
