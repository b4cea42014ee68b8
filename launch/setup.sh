#!/usr/bin/env bash
# Create ./.venv with torch and coe-dist (editable, with test tools). Safe to re-run: it reinstalls
# only when pyproject.toml changed. Knobs: PYTHON (interpreter, >= 3.11), TORCH_VERSION (default 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($py --version)" >&2
  "$py" -m venv .venv
fi
stamp=.venv/.coe-dist-installed
want="$(sha256sum pyproject.toml | cut -c1-16) torch-${TORCH_VERSION:-2.13.0}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing torch ${TORCH_VERSION:-2.13.0} and coe-dist into .venv (a minute or two)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned, so no dependency can pull a different build.
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" >"$stamp"
fi
