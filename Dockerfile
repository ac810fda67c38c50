# One image for the API and the workers (they differ only by command).
# CPU by default; for GPU workers build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY dns_core dns_core
COPY service service
COPY api api
COPY worker worker
COPY netsurgery netsurgery
COPY migrations migrations
RUN pip install -e ".[service,s3]" "torch==${TORCH_VERSION}"
RUN useradd --create-home --uid 10001 netsurgery && mkdir -p /data && chown netsurgery /data
USER netsurgery
ENV NETSURGERY_DATA_DIR=/data
EXPOSE 8000
CMD ["uvicorn", "--factory", "api.app:create_app", "--http", "api.server:JsonErrorsProtocol", "--host", "0.0.0.0", "--port", "8000"]
