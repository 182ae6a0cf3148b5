# The meterstream image: `worker`, `collector` and `sim` (staging) of docker-compose.yml.
# Python 3.11 slim, pinned; the package installed from this checkout (editable, so that the
# dashboard's static files under src/ ship as they are); runs as an unprivileged user.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/var/lib/meterstream/numba-cache

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/meterstream --create-home \
        meterstream

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install -e '.[fast]'
COPY config ./config
COPY deploy/staging ./deploy/staging
# the compose file mounts the production configuration here (read-only); the image's own
# config/ is the default
RUN mkdir -p /etc/meterstream /data/archive && cp -r config/. /etc/meterstream/

USER meterstream
WORKDIR /var/lib/meterstream
EXPOSE 8080 9100 9700
ENTRYPOINT ["meterstream"]
CMD ["--help"]
