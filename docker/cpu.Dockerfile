# spotbatch on CPU: the scaler, the scheduler, and workers without a GPU.
#   docker build -f docker/cpu.Dockerfile -t ghcr.io/spotbatch/spotbatch-cpu:0.1.0 .
# Bases are pinned to exact version tags; pin digests too in your CI
# (`docker buildx imagetools inspect python:3.11.14-slim-bookworm`).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index: a bare `torch` requirement would pull CUDA wheels.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY spotbatch /src/spotbatch
# Nothing to compile; pip itself is removed so the final stage carries no installer.
RUN pip install --no-cache-dir /src \
    && pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="spotbatch-cpu" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="spotbatch (CPU torch): scaler, scheduler, CPU workers" \
      org.opencontainers.image.source="https://github.com/spotbatch/spotbatch" \
      org.opencontainers.image.licenses="Apache-2.0"
# UID/GID 10001: the manifests' runAsUser/runAsGroup (numeric, so runAsNonRoot can check it).
RUN groupadd --system --gid 10001 spotbatch \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/spotbatch spotbatch
COPY --from=build /opt/venv /opt/venv
# Read-only root filesystem in Kubernetes: caches go to the emptyDir at ~/.cache.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/home/spotbatch/.cache \
    HF_HOME=/home/spotbatch/.cache/huggingface \
    TORCH_HOME=/home/spotbatch/.cache/torch \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /home/spotbatch
ENTRYPOINT ["spotbatch"]
CMD ["--help"]
