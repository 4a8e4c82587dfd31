# The classifier: `cifar10-server` on 0.0.0.0:50051 (gRPC), :8000 (the Open Inference Protocol over HTTP),
# Prometheus metrics on :9090.
#
# The project is installed as a package with the `server` extra (the server and client, without the
# test tools), so the bundled models come as package data and the image serves them from any
# directory. torch comes from PyPI with its CUDA libraries, so the same image runs on the CPU
# (default) and on an NVIDIA GPU (docker-compose.gpu.yml); they are most of the image's size.
#
# BASE_IMAGE is any Debian-like image with python3 and its venv module: the official image by
# default; deploy/podman/build.sh passes a Debian made locally where no registry is reachable.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# A venv, so the steps are the same on either base (Debian's own Python refuses pip installs, PEP 668).
# The dependencies first, from pyproject.toml alone, in their own layer: a change to the code or the
# models (rebuild after training) then reinstalls the project, not torch.
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -m venv /opt/venv \
    && python -c 'import tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["server"]))' > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/pyproject.toml /tmp/requirements.txt

# Installed as root and run as another user: the server cannot rewrite its code or its models.
COPY . /tmp/src
RUN pip install "/tmp/src[server]" \
    && rm -rf /tmp/src \
    && useradd --create-home --uid 10001 classifier

USER classifier
WORKDIR /home/classifier
EXPOSE 50051 8000 9090
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 \
    CMD ["cifar10-client", "--target", "127.0.0.1:50051", "--timeout", "5", "health"]
# /metrics binds loopback unless told: here all interfaces, so Prometheus on the compose network can scrape it
# (docker-compose.yml publishes only 50051 and 8000 to the host).
CMD ["cifar10-server", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]
