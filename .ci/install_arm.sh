#!/usr/bin/env bash
# Install the aarch64 cross toolchain and qemu user-mode emulation used by
# tvm_intlstm's ARM tests (tests/test_arm_emulation.py) and docs/arm.md.
# (.ci/setup_venv.sh installs these and the other test packages through .ci/install_apt.sh.)
#
# Idempotent: packages already installed are left alone, and `apt-get update`
# runs only when something has to be installed. Meant for CI (root, fresh
# Debian machine) and for developers (run with sudo if not root).
set -euo pipefail
here="$(dirname "$0")"
bash "$here/install_apt.sh" gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross \
    binutils-aarch64-linux-gnu qemu-user
for tool in aarch64-linux-gnu-g++ aarch64-linux-gnu-objdump qemu-aarch64; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install_arm.sh: $tool not found" >&2
        exit 1
    fi
done
echo "install_arm.sh: $(aarch64-linux-gnu-g++ --version | head -n1); $(qemu-aarch64 --version | head -n1)"
