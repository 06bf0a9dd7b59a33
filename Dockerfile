# exploopio/exploop — the server image: API (gunicorn), controller and Flower.
#
#   docker build -t exploopio/exploop .
#   docker run ... exploopio/exploop                               # exploop api --host 0.0.0.0
#   docker run ... exploopio/exploop exploop controller
#   docker run ... exploopio/exploop exploop init-db                # migrations (every start runs them too)
#   docker run ... exploopio/exploop celery --broker=redis://... flower
#
# Configuration is EXPLOOP_* (exploop/config.py): EXPLOOP_SQLALCHEMY_DATABASE_URI,
# EXPLOOP_REDIS_URL, EXPLOOP_CELERY__broker_url, ... docs/deployment.md covers each path.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.txt setup.cfg setup.py README.md ./
COPY exploop ./exploop
COPY workers ./workers
COPY admin ./admin
# requirements.txt is the compiled lock (every transitive dependency, with hashes): two
# builds install exactly the same thing; the package itself goes on top without resolving.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/exploop \
 && /opt/exploop/bin/pip install --no-cache-dir --require-hashes -r requirements.txt \
 && /opt/exploop/bin/pip install --no-cache-dir --no-deps . \
 && /opt/exploop/bin/exploop --version \
 && /opt/exploop/bin/celery --version

FROM ${PYTHON_IMAGE}
# tini as PID 1: signals reach gunicorn / the controller / Flower, zombies are reaped.
ARG TINI_VERSION=0.19.0-1+b3
RUN apt-get update \
 && apt-get install -y --no-install-recommends "tini=${TINI_VERSION}" \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 exploop \
 && useradd --system --uid 10001 --gid exploop --home-dir /home/exploop --create-home \
      --shell /usr/sbin/nologin exploop
COPY --from=build /opt/exploop /opt/exploop

ENV PATH=/opt/exploop/bin:$PATH \
    HOME=/home/exploop \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EXPLOOP_DATA_DIR=/home/exploop/data
USER 10001:10001
WORKDIR /home/exploop
# API on 8080, Flower on 5555.
EXPOSE 8080 5555
# One image, three commands: each deployment sets the healthcheck of its command
# (compose: api GET /health, flower GET /healthcheck; Helm: probes).
HEALTHCHECK NONE
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["exploop", "api", "--host", "0.0.0.0", "--port", "8080"]
