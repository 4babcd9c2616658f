# One image for every Conveyor service (gateway, scheduler, gpu_worker); compose picks the
# command. By default torch comes from PyPI (a CUDA build on x86-64, which also runs on
# CPU). For a much smaller CPU-only image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=
ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    CONVEYOR_CACHE_DIR=/cache

# g++ builds the CPU attention kernel (kernels/csrc) the first time a CPU worker starts;
# without it the worker falls back to the much slower plain-torch reference.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY kernels ./kernels
COPY conveyor ./conveyor
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url ${TORCH_INDEX_URL}} . \
    && useradd --create-home --uid 1000 conveyor \
    && mkdir -p /cache && chown conveyor /cache
USER conveyor
