# One image for the phase programs, the controller and the dashboard.
#
#   docker build -t vibechat:0.1.0 .
#   docker run --gpus all --ipc=host vibechat:0.1.0 torchrun --nproc-per-node=8 -m jobs.base_train --depth=20
#
# PyTorch's CUDA wheels from PyPI bring CUDA, cuDNN and NCCL themselves; the GPU driver comes from the
# node (NVIDIA container toolkit), so the base is a plain Python image. Give containers a large /dev/shm
# (--ipc=host or --shm-size=16g); the PyTorchJob template in k8s/phases/ mounts a memory-backed one.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements.lock /tmp/requirements.lock
# Every dependency at the version the tests ran with; torch's own pins bring the matching CUDA libraries.
RUN /opt/venv/bin/pip install --requirement /tmp/requirements.lock

FROM ${PYTHON_IMAGE}
# torch.compile's Triton backend builds a small C launcher at run time, so the image keeps a C compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 1000 vibechat && useradd --create-home --uid 1000 --gid 1000 vibechat
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY . /app
# The project runs from /app (not installed): `python -m jobs.X`, `streamlit run dashboard/app.py`, and the
# controller reads its PyTorchJob template from /app/k8s/phases (unless the ConfigMap's copy is mounted).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    HOME=/home/vibechat
USER 1000:1000
CMD ["python", "-m", "jobs.controller", "--help"]
