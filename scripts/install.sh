#!/usr/bin/env bash
# Installs everything nubis needs on a Debian 12 machine, as root: the Debian packages its tools,
# guest images, nested test host and benchmarks use, and a virtual environment at .venv with nubis
# and its development tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
    python3 python3-venv python3-pip   # the interpreter and venv
    gcc libc6-dev                      # benchmarks compile their C reference loops
    qemu-system-x86                    # the nested test host and the reference VMM
    busybox-static cpio lz4 xz-utils kmod  # guest initramfs, kernel extraction
    e2fsprogs                          # guest ext4 root filesystem (mke2fs -d)
    acpica-tools                       # iasl, which checks nubis's ACPI tables
    iproute2                           # tap devices and network namespaces in tests
    iperf3                             # the host end of the network benchmark
    ca-certificates
)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv is built on Debian's own python3 (installed above), named by path: another python3
# found first on PATH (a pyenv or hand-built one, often without PGO/LTO and with a shared
# libpython) starts nubis about a quarter slower. A venv made from another interpreter is rebuilt.
PYTHON=/usr/bin/python3
if [ -x .venv/bin/python ] && ! grep -qx 'home = /usr/bin' .venv/pyvenv.cfg 2>/dev/null; then
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
# Byte-compile nubis once, so no process (nor the nested test host, which sees this tree
# read-only) compiles it again at start-up.
.venv/bin/python -m compileall -q src >/dev/null
# ...and bundle its compiled modules into one file, which a launch reads instead of ~70 (nubis._bundle).
.venv/bin/python -c 'from nubis._bundle import build_nubis; build_nubis()'
