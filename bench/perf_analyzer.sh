#!/usr/bin/env bash
# NVIDIA's perf_analyzer, the field's benchmark, against this server over the Open Inference
# Protocol: it reads ModelConfig to start and ModelStatistics for the server-side queue and compute
# times. As root: bash bench/perf_analyzer.sh [MODEL] [PERF_ANALYZER ARGS...]
#
# perf_analyzer (PyPI perf-analyzer >= 2.58; 0.1.0 there is an empty placeholder) needs glibc 2.38,
# newer than Debian 12's, so it runs in a Debian 13 chroot made with debootstrap (about a minute and
# 300 MB, once; $TRIXIE_ROOT, default /opt/trixie), which shares the host's loopback. The server runs
# on the host with the bundled models; its port comes from its ready file.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-base-max}
shift || true
ROOT=${TRIXIE_ROOT:-/opt/trixie}
PYTHON=${PYTHON:-python}
PA=/opt/pa/lib/python3.13/site-packages/perf_analyzer/bin/perf_analyzer  # the binary: the wrapper script exits 0 on errors
SHARE=$(mktemp -d)
MOUNTED=()
cleanup() {
    local i
    for ((i=${#MOUNTED[@]}-1; i>=0; i--)); do umount -l "${MOUNTED[i]}" 2>/dev/null || true; done
    [[ -n ${SERVER:-} ]] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    rm -rf "$SHARE"
}
trap cleanup EXIT

in_chroot() {  # runs a command in the chroot with /proc, /dev, /sys and $SHARE (as /share) mounted
    mkdir -p "$ROOT/share"
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    mountpoint -q "$ROOT/proc" || { mount -t proc proc "$ROOT/proc" && MOUNTED+=("$ROOT/proc"); }
    local dir
    for dir in /dev /dev/pts /dev/shm /sys; do
        mountpoint -q "$ROOT$dir" || { mount --bind "$dir" "$ROOT$dir" && MOUNTED+=("$ROOT$dir"); }
    done
    mountpoint -q "$ROOT/share" || { mount --bind "$SHARE" "$ROOT/share" && MOUNTED+=("$ROOT/share"); }
    chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/pa/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}

# ----------------------------------------------------------------------------- the chroot, once
if [[ ! -x $ROOT/usr/bin/python3 ]]; then
    command -v debootstrap >/dev/null || { apt-get update -qq; apt-get install -y -qq debootstrap >/dev/null; }
    # The mirror apt already uses here (its first non-security source).
    MIRROR=${DEBIAN_MIRROR:-$( { grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
        2>/dev/null || true; } | awk '!/security/ {print $2; exit}')}
    rm -rf "$ROOT"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates trixie "$ROOT" "$MIRROR" >/dev/null
fi
# The host's extra certificate authorities (an egress proxy may re-sign TLS), for pip in the chroot.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    in_chroot update-ca-certificates >/dev/null
fi
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$ROOT/etc/pip.conf"
[[ -x $ROOT$PA ]] || in_chroot sh -c "[ -x /opt/pa/bin/pip ] || python3 -m venv /opt/pa; /opt/pa/bin/pip install -q 'perf-analyzer>=2.58'"

# ----------------------------------------------------------------------------- the server
"$PYTHON" -m cifar10_serving.server --port 0 --metrics-port -1 --http-port -1 --ready-file "$SHARE/ready.json" \
    --default-model "$MODEL" > "$SHARE/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 600); do [[ -s $SHARE/ready.json ]] && break; sleep 0.2; done
[[ -s $SHARE/ready.json ]] || { cat "$SHARE/server.log"; exit 1; }
PORT=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['port'])" "$SHARE/ready.json")
# perf_analyzer's input data: only the image tensor, UINT8 3 x 32 x 32, one CIFAR-10 image per example file.
"$PYTHON" - "$SHARE/input.json" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
images = [np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in sorted(Path("examples").glob("*.jpg"))]
json.dump({"data": [{"image": a.ravel().tolist()} for a in images]},
          open(sys.argv[1], "w"))
EOF

# ----------------------------------------------------------------------------- the run
ARGS=("$@")
[[ ${#ARGS[@]} -gt 0 ]] || ARGS=(--concurrency-range 1:4:3 --measurement-interval 3000)  # above 5: the explanation path's limit
in_chroot "$PA" -m "$MODEL" -i grpc -u "127.0.0.1:$PORT" --input-data /share/input.json "${ARGS[@]}"
