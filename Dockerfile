# The classifier: `python -m server` on 0.0.0.0:50051, Prometheus metrics on :9090.
#
# It runs the README's install with the `server` extra instead of `test` (the server and client,
# without the test tools), editable as in the README so that the default models directory,
# model/artifacts next to server/, is /app/model/artifacts: the models in this checkout are baked
# in. torch comes from PyPI with its CUDA libraries, so the same image runs on the CPU (default)
# and on an NVIDIA GPU (docker-compose.gpu.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
RUN pip install -e ".[server]" \
    && useradd --create-home --uid 10001 classifier

USER classifier
EXPOSE 50051 9090
CMD ["python", "-m", "server", "--host", "0.0.0.0"]
