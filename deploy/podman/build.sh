#!/usr/bin/env bash
# Builds the project's images with podman on a machine that reaches no container registry.
#
#   deploy/podman/build.sh [base|prometheus|classifier|all]...     (default: all, in that order)
#
#   base        $BASE_IMAGE: Debian bookworm with Python 3.11, made here with debootstrap (skipped when
#               the image exists; FORCE_BASE=1 remakes it)
#   prometheus  $PROMETHEUS_IMAGE: Debian's prometheus package on that base (Containerfile.prometheus)
#   classifier  $CLASSIFIER_IMAGE: the project's Dockerfile with BASE_IMAGE set to that base, pip inside
#               the build using this machine's pip settings (pip_config.py) and its local wheels
#
# Needs root, podman, runc, netavark, aardvark-dns and debootstrap (.ci/containers installs them).
# podman's own settings are in containers.conf, read through ./podman; the build's flags are below.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PODMAN="$HERE/podman"
PYTHON="${PYTHON:-python3}"  # the Python whose pip settings the build copies

BASE_IMAGE="${BASE_IMAGE:-localhost/cifar10-base:bookworm}"
PROMETHEUS_IMAGE="${PROMETHEUS_IMAGE:-localhost/cifar10-prometheus:debian}"
CLASSIFIER_IMAGE="${CLASSIFIER_IMAGE:-cifar10-classifier}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

# Host networking: the build reaches the Debian mirror and PyPI as this machine does. Docker's image
# format, because the OCI format has no HEALTHCHECK.
BUILD_FLAGS=(--network=host --format=docker)

log() { echo "build.sh: $*" >&2; }

SCRATCH="$(mktemp -d /var/tmp/cifar10-build.XXXXXX)"  # on disk: the base's root file system is 300 MB
trap 'rm -rf "$SCRATCH"' EXIT

make_base() {
    if [[ -z "${FORCE_BASE:-}" ]] && "$PODMAN" image exists "$BASE_IMAGE"; then
        log "$BASE_IMAGE exists (FORCE_BASE=1 remakes it)"
        return
    fi
    local rootfs="$SCRATCH/rootfs"
    log "debootstrap bookworm into $rootfs"
    # python3-venv brings ensurepip: the Dockerfile makes a venv, since Debian's own Python refuses
    # pip installs into it (PEP 668).
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # What python:3.11-slim sets and an imported tarball lacks.
    tar -C "$rootfs" -c . | "$PODMAN" import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$BASE_IMAGE" >/dev/null
    log "made $BASE_IMAGE"
}

build_prometheus() {
    "$PODMAN" build "${BUILD_FLAGS[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -f "$HERE/Containerfile.prometheus" -t "$PROMETHEUS_IMAGE" "$HERE"
}

build_classifier() {
    local conf="$SCRATCH/pip.conf" mounts=() path
    while read -r path; do
        mounts+=(-v "$path:$path:ro")
    done < <("$PYTHON" "$HERE/pip_config.py" "$conf")
    log "pip settings for the build: $(tr '\n' ' ' <"$conf")"
    "$PODMAN" build "${BUILD_FLAGS[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -v "$conf:/etc/pip.conf:ro" "${mounts[@]}" \
        -t "$CLASSIFIER_IMAGE" "$ROOT"
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(all)
for target in "${targets[@]}"; do
    case "$target" in
        base) make_base ;;
        prometheus) build_prometheus ;;
        classifier) build_classifier ;;
        all) make_base; build_prometheus; build_classifier ;;
        *) echo "usage: $0 [base|prometheus|classifier|all]..." >&2; exit 2 ;;
    esac
done
