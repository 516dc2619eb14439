# gateway: an authenticating reverse proxy, as one container or as a sidecar.
#
#   docker build -t gateway .
#   docker run -p 8080:8080 -e GATEWAY_SECRET="$(openssl rand -base64 48)" \
#       -v "$PWD/my-gateway.yaml:/etc/gateway/gateway.yaml:ro" -v gateway-data:/data \
#       --read-only --tmpfs /tmp gateway
#
# The config is read from /etc/gateway/gateway.yaml (GATEWAY_CONFIG); the SQLite store lives
# in the /data volume (GATEWAY_STORE, used by the reference config). Nothing else is written:
# the root filesystem may be read-only. /tmp is written only by `--workers N` (N > 1), for
# the workers' shared metrics: give it a tmpfs then. The image includes the Redis client.
# Operating it: docs/operations.md. Tested without a Docker engine by tests/test_packaging.py.

# --- build: the wheels, and a virtual environment made from them only ------------------------
FROM python:3.12-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# gateway/demo_app.py is a link to the example app, which the package ships.
COPY examples/legacy-app ./examples/legacy-app
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[redis]"
# pip compiles every module as it installs, so nothing needs to write bytecode at run time.
RUN python -m venv /opt/gateway \
 && /opt/gateway/bin/pip install --no-cache-dir --no-index --find-links /wheels "gateway[redis]"

# --- run: the base image, the environment, a user; no compiler, no wheels, no sources --------
FROM python:3.12-slim-bookworm
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="An authenticating reverse proxy for apps that know nothing about tokens" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12-slim-bookworm"
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway \
 && mkdir -p /data /etc/gateway \
 && chown 10001:10001 /data \
 && chmod 0750 /data
COPY --from=build /opt/gateway /opt/gateway
COPY config/gateway.yaml /etc/gateway/gateway.yaml
ENV PATH=/opt/gateway/bin:$PATH \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    GATEWAY_STORE=sqlite:///data/gateway.db \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["gateway"]
CMD ["run"]
