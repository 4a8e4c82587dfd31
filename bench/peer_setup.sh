#!/usr/bin/env bash
# Installs the peer for `python -m bench.peer`: TorchServe 0.12 and torch-model-archiver in a venv of
# their own, and Java 17 when there is no java.
#
#   bench/peer_setup.sh                                   # venv at .cache/torchserve-venv
#   TORCHSERVE_VENV=/elsewhere PYTHON=python3.11 bench/peer_setup.sh
#
# The venv sees the base interpreter's site-packages (--system-site-packages), so TorchServe runs on the
# torch and torchvision already installed there, the ones our server uses: nothing here installs or
# upgrades torch. TorchServe's own packages go in with --no-deps for that reason, and what they need
# beside torch is listed by hand: psutil, packaging, Pillow, wheel (declared), pyyaml (used at start but not
# declared), enum-compat (the archiver's declared dependency, a no-op on Python 3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TORCHSERVE_VENV:-$ROOT/.cache/torchserve-venv}"
PYTHON="${PYTHON:-python3}"
TORCHSERVE_VERSION="0.12.0"

if ! command -v java >/dev/null 2>&1; then
    echo "installing Java 17 (openjdk-17-jre-headless)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q openjdk-17-jre-headless
fi
java -version 2>&1 | head -1

if ! "$PYTHON" -c "import torch, torchvision" 2>/dev/null; then
    echo "$PYTHON has no torch and torchvision; set PYTHON to the interpreter our server runs on" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    # From a venv, `-m venv` starts from that venv's base interpreter, whose site-packages hold torch.
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q --no-deps "torchserve==$TORCHSERVE_VERSION" \
    "torch-model-archiver==$TORCHSERVE_VERSION" enum-compat
"$VENV/bin/python" -m pip install -q psutil packaging pillow pyyaml wheel
"$VENV/bin/python" - <<'EOF'
import torch, torchvision, ts, model_archiver, yaml, psutil
print(f"TorchServe venv ready: torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.__file__}")
EOF
echo "$VENV"
