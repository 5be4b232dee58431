# syntax=docker/dockerfile:1
# shardworker: python:3.11-slim, non-root (uid 10001), tini as PID 1, ready for a read-only
# root filesystem. Build: docker build -t shardworker:dev .
# The build and install commands live in docker/wheels.sh. tests/test_image.py builds this
# file with podman and runs the image as the Helm chart does.

# Any Debian bookworm image with python3 (and its venv and pip modules); pin it by digest
# for a reproducible build: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: wheels only, nothing of this stage reaches the image ----
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY docker/wheels.sh /usr/local/bin/wheels.sh
# Dependencies first, from the lock file alone (exact versions, every file checked against
# its hash): this layer is rebuilt when requirements.lock changes, not on every source edit.
COPY requirements.lock ./
RUN wheels.sh deps requirements.lock /wheels/deps
# Then the source.
COPY pyproject.toml README.md ./
COPY shardworker ./shardworker
RUN wheels.sh app /src /wheels/app

# ---- runtime ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="shardworker" \
      org.opencontainers.image.description="Sharded IMAP IDLE to Redis Streams ingestion for Alga PSA" \
      org.opencontainers.image.licenses="Apache-2.0"

# tini as PID 1: forwards SIGTERM to the coordinator (which drains its workers itself, so
# no -g) and reaps zombies.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 shardworker \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin shardworker

# The wheels are bind-mounted, never copied into a layer. Dependencies get their own layer,
# cached until requirements.lock changes.
RUN --mount=type=bind,from=build,source=/wheels/deps,target=/wheels/deps \
    --mount=type=bind,source=docker/wheels.sh,target=/usr/local/bin/wheels.sh \
    wheels.sh install /wheels/deps /opt/shardworker
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,source=docker/wheels.sh,target=/usr/local/bin/wheels.sh \
    wheels.sh install /wheels/deps /opt/shardworker /wheels/app

# prometheus multiprocess files go to a volume, so the root filesystem can be read-only
# (the Helm chart mounts an emptyDir here; compose a tmpfs).
RUN install -d -o 10001 -g 10001 -m 0750 /var/lib/shardworker/metrics
VOLUME ["/var/lib/shardworker/metrics"]

ENV PATH=/opt/shardworker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SHARDWORKER_METRICS_DIR=/var/lib/shardworker/metrics

USER 10001:10001
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["shardworker", "check-health"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["shardworker", "run"]
