# syntax=docker/dockerfile:1
# KD Lab images (built by docker-compose.yml; checked by tests/test_compose.py, not by a Docker
# engine in CI):
#   target `kdlab` (the default, last stage): backend, Ray head and Ray GPU workers — the `kdlab`
#     package with Ray, and a CPU or CUDA torch chosen by TORCH_VARIANT:
#       docker build -t kdlab:cpu .
#       docker build -t kdlab:cuda --build-arg TORCH_VARIANT=cu126 .
#   target `mlflow`: the MLflow tracking server with the PostgreSQL driver.
#       docker build --target mlflow -t kdlab-mlflow .

ARG PYTHON_IMAGE=python:3.11-slim

# --- MLflow tracking server ----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS mlflow
ARG MLFLOW_VERSION=3.17.2
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg[binary]>=3.1" \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir -p /mlartifacts && chown mlflow:mlflow /mlartifacts
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000", "--artifacts-destination", "/mlartifacts"]

# --- KD Lab: backend, Ray head, Ray workers -------------------------------------------------------
FROM ${PYTHON_IMAGE} AS kdlab
# cpu, or a CUDA wheel index of PyTorch such as cu126 (https://download.pytorch.org/whl/<variant>)
ARG TORCH_VARIANT=cpu
ARG TORCH_SPEC=torch>=2.4
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    KDLAB_DATA_DIR=/data
RUN useradd --create-home --uid 1000 kdlab \
    && mkdir -p /data /app && chown kdlab:kdlab /data /app
# torch first, from the variant's index, so `pip install .` below finds it satisfied
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "${TORCH_SPEC}"
WORKDIR /app
COPY --chown=kdlab:kdlab pyproject.toml README.md ./
# kdlab/ holds the package root and links to the folders beside it (backend, worker, frontend,
# migrations): the image keeps the repository's layout
COPY --chown=kdlab:kdlab kdlab kdlab
COPY --chown=kdlab:kdlab backend backend
COPY --chown=kdlab:kdlab worker worker
COPY --chown=kdlab:kdlab frontend/templates frontend/templates
COPY --chown=kdlab:kdlab frontend/static frontend/static
COPY --chown=kdlab:kdlab frontend/recipes frontend/recipes
COPY --chown=kdlab:kdlab migrations migrations
COPY --chown=kdlab:kdlab examples examples
# Editable, so an operator can patch /app in a derived image; the pages, recipes and Alembic
# scripts are read through the package (kdlab/frontend, kdlab/migrations) as in the wheel.
RUN pip install -e ".[ray]" && python -c "import torch, ray, kdlab.backend.cli, kdlab.worker.trainer, kdlab.distill"
USER kdlab
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/health', timeout=4)"]
ENTRYPOINT ["kdlab"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
