#!/usr/bin/env bash
# Install the aarch64 cross toolchain and qemu user-mode emulation used by
# tvm_intlstm's ARM tests (tests/test_arm_emulation.py) and docs/arm.md.
#
# Idempotent: packages already installed are left alone, and `apt-get update`
# runs only when something has to be installed. Meant for CI (root, fresh
# Debian machine) and for developers (run with sudo if not root).
set -euo pipefail

PACKAGES=(
    gcc-aarch64-linux-gnu
    g++-aarch64-linux-gnu
    libc6-dev-arm64-cross
    binutils-aarch64-linux-gnu
    qemu-user
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_arm.sh: all ARM tools already installed (${PACKAGES[*]})"
else
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo"
    fi
    echo "install_arm.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Sanity check: every tool the package calls must now be on PATH.
for tool in aarch64-linux-gnu-g++ aarch64-linux-gnu-objdump qemu-aarch64; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install_arm.sh: $tool not found after installation" >&2
        exit 1
    fi
done
echo "install_arm.sh: $(aarch64-linux-gnu-g++ --version | head -n1); $(qemu-aarch64 --version | head -n1)"
