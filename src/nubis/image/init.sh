#!/bin/sh
# nubis guest init: the first user process of a nubis test guest (busybox sh).
#
# It prints marker lines on the console that tests parse, loads the kernel modules listed in
# /etc/nubis/modules (dependency order, computed at build time from modules.dep), runs what the
# kernel command line asks for, reports the exit status and powers off.
#
# Kernel command line (read from /proc/cmdline, because the kernel does not pass parameters with
# a dot in their name to init):
#   nubis.cmd=<base64>      run this shell command (standard base64 of its UTF-8 bytes)
#   nubis.script=<device>   run the shell script stored on this disk (zero padding is ignored)
#   nubis.end=poweroff|shell|exit|hang
#                           what to do afterwards: power off (default), start a shell on the
#                           console, exit init (the kernel panics; with panic=-1 and -no-reboot the
#                           VMM exits), or sleep forever
#   root=<device> [ro|rw]   mount this ext4 disk and switch to it before running the command
#
# Markers, each alone on a line:
#   NUBIS-USERSPACE                 init has started (printed before anything else)
#   NUBIS-MODULE-FAILED=<path>      a module did not load
#   NUBIS-MODULES-LOADED=<count>    module loading finished
#   NUBIS-ROOT=<device>             switching to the root disk; NUBIS-ROOTFS follows from it
#   NUBIS-ROOT-FAILED=<device>      the root disk could not be mounted
#   NUBIS-EXIT-STATUS=<n>           the command finished with status n
#   NUBIS-POWEROFF / NUBIS-SHELL / NUBIS-INIT-EXIT / NUBIS-HANG
#                                   the chosen ending is about to happen
#   NUBIS-POWER-BUTTON              the ACPI power button was pressed; NUBIS-POWEROFF follows
#
# When the kernel offers input event devices (the ACPI button driver's power button, through
# evdev), init starts busybox acpid before running the command, as a distribution with acpid or
# systemd-logind would: a power button press syncs the disks and powers the guest off at once.
#
# Markers go to /dev/console, the device console= names, so they never depend on /dev/kmsg or
# the kernel's log level. When console=hvc0 the console only exists once virtio_console is
# loaded; markers printed before that are held back and printed as soon as it appears.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022
set -f

pending=""
say() {
    if [ -z "$pending" ] && echo "$1" >/dev/console 2>/dev/null; then
        return 0
    fi
    pending="$pending$1
"
}
flush_pending() {
    if [ -n "$pending" ] && printf '%s' "$pending" >/dev/console 2>/dev/null; then
        pending=""
    fi
}
wait_for() {
    # wait_for PATH: up to 10 seconds for a device node to appear.
    n=0
    while [ ! -e "$1" ] && [ "$n" -lt 100 ]; do
        usleep 100000
        n=$((n + 1))
    done
    [ -e "$1" ]
}

stage=initramfs
[ -e /etc/nubis/initramfs ] || stage=rootfs
[ "$1" = "--switched-root" ] && stage=switched

if [ "$stage" = switched ]; then
    say "NUBIS-ROOTFS"
else
    say "NUBIS-USERSPACE"
    mount -t devtmpfs devtmpfs /dev 2>/dev/null
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t tmpfs -o mode=0755 tmpfs /run
fi
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
mount -t tmpfs tmpfs /tmp 2>/dev/null

cmd_b64=""
script=""
end=poweroff
root=""
rootmode=rw
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        nubis.cmd=*) cmd_b64=${arg#nubis.cmd=} ;;
        nubis.script=*) script=${arg#nubis.script=} ;;
        nubis.end=*) end=${arg#nubis.end=} ;;
        root=*) root=${arg#root=} ;;
        ro) rootmode=ro ;;
        rw) rootmode=rw ;;
    esac
done

if [ "$stage" != switched ]; then
    release=$(uname -r)
    count=0
    while read -r module; do
        [ -n "$module" ] || continue
        if insmod "/lib/modules/$release/$module" 2>/dev/null; then
            count=$((count + 1))
        else
            say "NUBIS-MODULE-FAILED=$module"
        fi
    done </etc/nubis/modules
    # The console may have just appeared (console=hvc0 needs virtio_console).
    if (: >/dev/console) 2>/dev/null; then
        exec </dev/console >/dev/console 2>&1
    fi
    flush_pending
    say "NUBIS-MODULES-LOADED=$count"
fi
ip link set lo up 2>/dev/null

if [ -n "$root" ] && [ "$stage" = initramfs ]; then
    mkdir -p /newroot
    if wait_for "$root" && mount -t ext4 -o "$rootmode" "$root" /newroot; then
        say "NUBIS-ROOT=$root"
        for m in dev proc sys run; do
            mkdir -p "/newroot/$m"
            mount --move "/$m" "/newroot/$m"
        done
        exec switch_root /newroot /init --switched-root
    fi
    say "NUBIS-ROOT-FAILED=$root"
fi

start_acpid() {
    # busybox acpid reads /dev/input/event*, maps KEY_POWER to the event PWRF and runs the
    # program PWRF/00000080 in its configuration directory (in /run, which both stages share).
    [ -e /dev/input/event0 ] || return 0
    conf=/run/nubis-acpi
    mkdir -p "$conf/PWRF"
    echo "EV_KEY 01 KEY_POWER 116 1 button/power PWRF 00000080" >"$conf/acpi.map"
    echo "PWRF PWRF/00000080" >"$conf/acpid.conf"
    printf '%s\n' '#!/bin/sh' \
        'echo NUBIS-POWER-BUTTON >/dev/console' \
        'sync' \
        'mount -o remount,ro / 2>/dev/null' \
        'sync' \
        'echo NUBIS-POWEROFF >/dev/console' \
        'poweroff -f' >"$conf/PWRF/00000080"
    chmod 0755 "$conf/PWRF/00000080"
    acpid -d -c "$conf" -a "$conf/acpid.conf" -M "$conf/acpi.map" -p "$conf/acpid.pid" \
        </dev/null >"$conf/acpid.log" 2>&1 &
}
start_acpid

status=""
if [ -n "$cmd_b64" ]; then
    echo "$cmd_b64" | base64 -d >/run/nubis-cmd
    sh /run/nubis-cmd </dev/null
    status=$?
elif [ -n "$script" ]; then
    if wait_for "$script"; then
        tr -d '\000' <"$script" >/run/nubis-script
        sh /run/nubis-script </dev/null
        status=$?
    else
        echo "nubis init: the script device $script did not appear" >/dev/console
        status=127
    fi
fi
[ -n "$status" ] && say "NUBIS-EXIT-STATUS=$status"
flush_pending

case "$end" in
    shell)
        say "NUBIS-SHELL"
        setsid cttyhack sh
        ;;
    exit)
        say "NUBIS-INIT-EXIT"
        exit "${status:-0}"
        ;;
    hang)
        say "NUBIS-HANG"
        while :; do sleep 3600; done
        ;;
esac
sync
say "NUBIS-POWEROFF"
poweroff -f
