# A GPU image for train_bert.py and train_bert_ds.py. No Docker engine ran where this project is developed: this
# file is checked by tests/test_dockerfile.py (its pins agree with requirements.txt), not by a build.
#
#   docker build -t bert-pretrain .
#   docker run --gpus all --rm bert-pretrain                       # python train_bert.py --help
#
# The base is PyTorch's official CUDA *devel* image: the torch of requirements.txt, and nvcc, so DeepSpeed can build
# its C++/CUDA ops. Its tag's torch version must be requirements.txt's torch pin (the test checks it).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/trainer/.cache/huggingface \
    TORCH_EXTENSIONS_DIR=/home/trainer/.cache/torch_extensions

# GPU generations the prebuilt DeepSpeed ops are compiled for (V100, A100, A10/RTX 30, L4/L40/RTX 40, H100/H200).
# Without a GPU during the build, DeepSpeed needs this list instead of asking the card.
ARG TORCH_CUDA_ARCH_LIST="7.0;8.0;8.6;8.9;9.0"

WORKDIR /app
COPY requirements.txt .
# 1. Every pin of requirements.txt. torch is already the base image's (the same version, so pip keeps it).
# 2. DeepSpeed again, at its pin, now building the ops our configs use ahead of time (CPU Adam for ZeRO-Offload,
#    fused Adam, the utils op) instead of JIT-compiling them at a run's start (~1 minute each).
# 3. Fail the build if the base image's torch is not the pinned one; ds_report lists what was built.
RUN python -m pip install -r requirements.txt \
 && DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_UTILS=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
    python -m pip install --no-build-isolation --no-deps --force-reinstall "$(grep -E '^deepspeed==' requirements.txt)" \
 && python -c "import sys, torch; pin = [l.split('==')[1].strip() for l in open('requirements.txt') if l.startswith('torch==')][0]; sys.exit(0 if torch.__version__.split('+')[0] == pin else f'base image torch {torch.__version__} != requirements.txt torch=={pin}')" \
 && (ds_report || true)

# The project, owned by an unprivileged user that runs everything.
RUN useradd --create-home --uid 1000 trainer
COPY --chown=trainer:trainer . /app
USER trainer

CMD ["python", "train_bert.py", "--help"]
