#!/usr/bin/env bash
# Install the Debian packages the tests need (.ci/install_apt.sh: aarch64 toolchain, qemu-user,
# python3.11-doc), then create or reuse .venv/ in the repo root with tvm_intlstm and its pinned
# dependencies. Idempotent and quick on a second run: one dpkg-query for the packages, and a stamp
# of pyproject.toml's hash skips the pip install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install_apt.sh
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.tvm_intlstm_stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# The CPU wheel of torch 2.13.0 lies in /opt/wheels on these machines; any other torch pulls CUDA.
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)
echo "[setup] installing tvm_intlstm and pinned dependencies into .venv (first run: a few minutes)" >&2
.venv/bin/pip install -q "${links[@]}" -e ".[test]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
.venv/bin/python -c "import tvm, torch, tvm_intlstm" || { echo "[setup] install failed" >&2; exit 1; }
echo "$want" > "$stamp"
