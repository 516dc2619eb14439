# gateway: an authenticating reverse proxy.
#
#   docker build -t gateway .
#   docker run -p 8080:8080 -e GATEWAY_SECRET="$(openssl rand -base64 48)" \
#       -v "$PWD/my-gateway.yaml:/etc/gateway/gateway.yaml:ro" -v gateway-data:/data gateway
#
# Config is read from /etc/gateway/gateway.yaml; the SQLite store lives in the /data volume.
# The root filesystem may be read-only.

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY examples/legacy-app ./examples/legacy-app
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
 && mkdir -p /data /etc/gateway \
 && chown gateway:gateway /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/gateway.yaml /etc/gateway/gateway.yaml
ENV GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    GATEWAY_STORE=sqlite:///data/gateway.db \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER gateway
VOLUME ["/data", "/etc/gateway"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["gateway"]
CMD ["run"]
