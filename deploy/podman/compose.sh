#!/usr/bin/env bash
# docker compose with podman-compose: the project's docker-compose.yml plus compose.override.yml.
#
#   deploy/podman/build.sh                                 # the images first (compose would not mount pip's wheels)
#   deploy/podman/compose.sh up -d classifier prometheus   # Grafana is left out: no image for it here
#   deploy/podman/compose.sh ps
#   deploy/podman/compose.sh down
#
# Published on loopback: gRPC on 127.0.0.1:50051, Prometheus on 127.0.0.1:9090. -p NAME (or
# COMPOSE_PROJECT_NAME) names the project (default: the checkout's folder); PODMAN_COMPOSE is the command.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

# Not in a pod: each service in its own network namespace on the project's network, as under Docker,
# so "classifier:9090" resolves through the network's DNS as it does there.
exec ${PODMAN_COMPOSE:-podman-compose} --podman-path "$HERE/podman" --in-pod=false \
    -f "$ROOT/docker-compose.yml" -f "$HERE/compose.override.yml" "$@"
