# The Flask + gunicorn gateway. Build context: the repository root (see docker-compose.yml).
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY ensemble ./ensemble
COPY gateway ./gateway
RUN pip install ".[gateway]" \
 && useradd --system --no-create-home --shell /usr/sbin/nologin gateway
USER gateway

EXPOSE 8080 9102
# gateway/gunicorn.conf.py takes bind address, workers and threads from the GATEWAY_* environment and
# creates the Prometheus multiprocess directory; `gateway:create_app()` runs in each worker after fork.
CMD ["gunicorn", "-c", "gateway/gunicorn.conf.py", "gateway:create_app()"]
