#!/usr/bin/env bash
# Installs the peer for `python -m bench.peer`: TorchServe 0.12 and torch-model-archiver in a venv of
# their own, and Java 17 when there is no java.
#
#   bench/peer_setup.sh                                   # venv at .cache/torchserve-venv
#   TORCHSERVE_VENV=/elsewhere PYTHON=python3.11 bench/peer_setup.sh
#
# TorchServe runs on the torch and torchvision that $PYTHON imports, the ones our server uses: nothing
# here installs or upgrades torch. The new venv sees every site-packages directory $PYTHON sees, after
# its own (a .pth file lists them), which works whether $PYTHON is a venv (the README's install puts
# torch in it) or an interpreter with torch installed system-wide. Not `--system-site-packages`: from a
# venv, `-m venv` starts from that venv's base interpreter, whose site-packages need not hold torch.
# TorchServe's own packages go in with --no-deps for that reason, and what they need beside torch is
# listed by hand: psutil, packaging, Pillow, wheel (declared), pyyaml (used at start but not declared),
# enum-compat (the archiver's declared dependency, a no-op on Python 3).
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
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --no-deps "torchserve==$TORCHSERVE_VERSION" \
    "torch-model-archiver==$TORCHSERVE_VERSION" enum-compat
"$VENV/bin/python" -m pip install -q psutil packaging pillow pyyaml wheel

# After the installs, so that pip above put TorchServe's needs in the venv itself.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PYTHON" -c 'import site, sys
dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
print("\n".join(dict.fromkeys([*dirs, *site.getsitepackages()])))' > "$SITE/_our_server_site_packages.pth"

TORCH_FILE="$("$PYTHON" -c 'import torch; print(torch.__file__)')"
"$VENV/bin/python" - "$TORCH_FILE" <<'EOF'
import sys
import torch, torchvision, ts, model_archiver, yaml, psutil
if torch.__file__ != sys.argv[1]:
    sys.exit(f"the TorchServe venv imports torch from {torch.__file__}, not our server's {sys.argv[1]}: "
             "remove the venv and run this again")
print(f"TorchServe venv ready: torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.__file__}")
EOF
echo "$VENV"
