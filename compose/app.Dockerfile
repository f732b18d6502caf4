# The examples' image: amqp-listener with its `examples` extra (FastAPI, uvicorn), and the
# examples themselves. Built by the compose files, from the repository root:
#   docker compose -f compose/docker-compose.yml build
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY listener ./listener
RUN pip install --no-cache-dir '.[examples]'
COPY examples ./examples

# The examples are not part of the installed package: import them from /app.
ENV PYTHONPATH=/app PYTHONUNBUFFERED=1
# /data is where the FileCopier example copies files (a volume shared with the web app).
RUN useradd --create-home app && mkdir /data && chown app /data
USER app
