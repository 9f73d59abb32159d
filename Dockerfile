# The one image of the service: the CLI, the Celery worker, beat and Flower.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY migrations ./migrations
COPY worker ./worker
RUN pip install ".[flower]"

# Workers need no privileges; beat keeps its schedule file in /tmp.
RUN useradd --create-home --uid 10001 audience-sync
USER audience-sync
