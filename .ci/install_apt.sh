#!/usr/bin/env bash
# Install the Debian packages tvm_intlstm's tests need (called by .ci/setup_venv.sh, so the
# README's commands set up a fresh machine by themselves):
#   - the aarch64 cross toolchain and qemu user-mode emulation (ARM and RPC tests, docs/arm.md);
#   - python3.11-doc, the char-LM corpus (tests/test_char_lm_*.py, examples/char_lm);
#   - gcc and g++, the host compilers (TVM's export_library links modules with g++; the AMX trap
#     emulator, tvm_intlstm/runtime/amx_trap.c, is compiled with cc).
# With arguments, installs just those packages (.ci/install_arm.sh passes the ARM ones).
#
# Idempotent and quick when everything is there: one dpkg-query for all packages, and
# `apt-get update` runs only when something has to be installed. Needs root (or sudo) to install;
# without either, or without apt-get, it names what is missing and returns 0 (the venv set-up goes
# on; the tests that need the packages then fail or skip). TVM_INTLSTM_SKIP_APT=1 skips it.
set -euo pipefail

ARM_PACKAGES=(
    gcc-aarch64-linux-gnu
    g++-aarch64-linux-gnu
    libc6-dev-arm64-cross
    binutils-aarch64-linux-gnu
    qemu-user
)
if [ "$#" -gt 0 ]; then
    PACKAGES=("$@")
else
    PACKAGES=("${ARM_PACKAGES[@]}" python3.11-doc gcc g++)
fi
if [ "${TVM_INTLSTM_SKIP_APT:-0}" = "1" ]; then
    echo "install_apt.sh: TVM_INTLSTM_SKIP_APT=1, not checking ${PACKAGES[*]}" >&2
    exit 0
fi

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    installed=$(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null \
                | awk '$NF == "installed" && $(NF-1) == "ok" {print $1}' || true)
    for pkg in "${PACKAGES[@]}"; do
        if ! grep -qx -- "$pkg" <<<"$installed"; then
            missing+=("$pkg")
        fi
    done
else
    echo "install_apt.sh: no dpkg-query (not Debian/Ubuntu?): install by hand: ${PACKAGES[*]}" >&2
    exit 0
fi

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_apt.sh: missing ${missing[*]}; not root and no sudo: install them by hand" \
             "(apt-get install ${missing[*]}); the tests that need them will fail or skip" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_apt.sh: missing ${missing[*]} and no apt-get: install them by hand" >&2
    exit 0
fi
echo "install_apt.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"

# Sanity check: the ARM tools the package calls must now be on PATH.
for pkg in "${missing[@]}"; do
    case "$pkg" in
        g++-aarch64-linux-gnu) tools=(aarch64-linux-gnu-g++) ;;
        binutils-aarch64-linux-gnu) tools=(aarch64-linux-gnu-objdump) ;;
        qemu-user) tools=(qemu-aarch64) ;;
        *) tools=() ;;
    esac
    for tool in "${tools[@]}"; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "install_apt.sh: $tool not found after installing $pkg" >&2
            exit 1
        fi
    done
done
