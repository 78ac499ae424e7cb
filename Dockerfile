# dicom-router image: receives on 11112, serves /metrics, /healthz and /readyz on 9110.
#   docker build -t dicom-router .
#   docker run -d --name dicom-router -p 11112:11112 -p 9110:9110 --stop-timeout 45 \
#     -v dicom-spool:/var/lib/dicom-router -v "$PWD/rules:/etc/dicom-router/rules:ro" dicom-router
# Any base with Python 3.11+ and its venv module will do, e.g. a Debian bookworm root file system
# with python3 and python3-venv: docker build --build-arg BASE=debian-bookworm-python -t dicom-router .
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/dicom-router/venv/bin:$PATH

RUN groupadd --system --gid 10001 dicom-router \
    && useradd --system --uid 10001 --gid dicom-router --home-dir /var/lib/dicom-router \
       --no-create-home --shell /usr/sbin/nologin dicom-router

WORKDIR /opt/dicom-router/src
COPY pyproject.toml README.md ./
COPY router ./router
RUN python3 -m venv /opt/dicom-router/venv \
    && /opt/dicom-router/venv/bin/pip install --no-cache-dir . \
    && rm -rf /opt/dicom-router/src

# The example configuration, with the spool on the volume and the metrics port reachable through
# the container's published port (the file's default is 127.0.0.1). Mount your own rules/ (or the whole
# /etc/dicom-router) over it.
COPY router.toml /etc/dicom-router/router.toml
COPY rules /etc/dicom-router/rules
RUN sed -i 's|^spool_dir = "[^"]*"|spool_dir = "/var/lib/dicom-router/spool"|; /^\[metrics\]/,/^\[/ s|^host = "[^"]*"|host = "0.0.0.0"|' /etc/dicom-router/router.toml \
    && mkdir -p /var/lib/dicom-router/spool \
    && chown -R dicom-router:dicom-router /var/lib/dicom-router

WORKDIR /var/lib/dicom-router
USER 10001:10001
VOLUME ["/var/lib/dicom-router"]
EXPOSE 11112 9110

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9110/healthz', timeout=4)"]

# SIGTERM drains (finishes the C-STORE in progress, keeps the queue); give it time to.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dicom-router"]
CMD ["serve", "--config", "/etc/dicom-router/router.toml"]
