# GPU image for training: PyTorch with the CUDA toolchain, zigma-lightning, and (optionally) the compiled
# mamba-ssm scan kernel as an extra scan backend (causal-conv1d is not used: see requirements-gpu.txt). zigma itself
# needs neither: on CUDA it uses its Triton kernel, elsewhere the pure-PyTorch scan.
#   docker build -t zigma-lightning .
#   docker build --build-arg WITH_MAMBA_KERNELS=0 -t zigma-lightning:lean .
#   docker run --gpus all -v $PWD/runs:/workspace/zigma-lightning/runs zigma-lightning
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
FROM ${BASE_IMAGE}

ARG WITH_MAMBA_KERNELS=1
ENV PYTHONUNBUFFERED=1
WORKDIR /workspace/zigma-lightning

COPY requirements.txt requirements-dev.txt requirements-gpu.txt ./
RUN pip install --no-cache-dir -r requirements.txt -r requirements-dev.txt
# The kernels are sdist-only: build them against the image's torch (nvcc from the -devel image), skipping the
# prebuilt-wheel download that fails offline.
RUN if [ "$WITH_MAMBA_KERNELS" = "1" ]; then \
        MAMBA_FORCE_BUILD=TRUE MAX_JOBS=4 \
        pip install --no-cache-dir --no-build-isolation -r requirements-gpu.txt; \
    fi

COPY . .
CMD ["python", "cli.py", "fit", "--config", "configs/quickstart.yaml"]
