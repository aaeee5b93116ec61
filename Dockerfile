# A CUDA image with `dowser` as its entrypoint:
#   docker build -t dowser-tool .
#   docker run --gpus all -v ~/.cache/huggingface:/root/.cache/huggingface -v $PWD:/work -w /work \
#       -e HF_TOKEN dowser-tool probe llava-hf/llava-1.5-7b-hf --out /work/llava.dowser.safetensors
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/dowser-tool
COPY pyproject.toml README.md ./
COPY dowser_tool ./dowser_tool
RUN pip install .

ENTRYPOINT ["dowser"]
CMD ["--help"]
