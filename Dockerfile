# CUDA image for training and explaining on a GPU: `docker build -t adiff .`
# then e.g. `docker run --gpus all -v $PWD:/work -w /work adiff train --config configs/default.yaml`.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/anomaly_diffusion
COPY pyproject.toml README.md ./
COPY anomaly_diffusion ./anomaly_diffusion
COPY configs ./configs
# torch comes from the base image (CUDA build); the package's torch>=2.4 requirement is already met
RUN pip install . && adiff --help > /dev/null

WORKDIR /work
ENTRYPOINT ["adiff"]
CMD ["--help"]
