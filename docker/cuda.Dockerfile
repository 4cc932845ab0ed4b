# spotbatch GPU worker. The torch CUDA wheels bring their own CUDA libraries (cuBLAS,
# cuDNN, NCCL), so the base is NVIDIA's minimal `base` flavour (CUDA compat + driver
# wiring); the node supplies the driver (>= 570 for CUDA 12.8).
#   docker build -f docker/cuda.Dockerfile -t ghcr.io/spotbatch/spotbatch-cuda:0.1.0 .
# Bases are pinned to exact version tags; pin digests too in your CI.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# No apt version pins (DL3008): the base tag is pinned, and Ubuntu drops superseded
# package versions from its archive, so exact pins break rebuilds and block security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY spotbatch /src/spotbatch
RUN pip install --no-cache-dir /src \
    && pip uninstall --yes pip

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="spotbatch-cuda" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="spotbatch GPU worker (CUDA torch)" \
      org.opencontainers.image.source="https://github.com/spotbatch/spotbatch" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# The interpreter only: the venv from the build stage links against this python3.
# No apt version pins (DL3008): see the build stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 spotbatch \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/spotbatch spotbatch
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/home/spotbatch/.cache \
    HF_HOME=/home/spotbatch/.cache/huggingface \
    TORCH_HOME=/home/spotbatch/.cache/torch \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/spotbatch
ENTRYPOINT ["spotbatch"]
CMD ["--help"]
