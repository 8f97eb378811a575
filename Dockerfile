# CPU image of longctx. Build:  docker build -t longctx .
# Run:    docker run --rm -v "$PWD/runs:/work/runs" longctx train --max-steps 50
#         docker run --rm -v "$PWD/runs:/work/runs" -v "$PWD/data:/data" longctx eval --ppl /data/book.txt
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LONGCTX_CACHE=/work/.cache/longctx
WORKDIR /opt/longctx
COPY pyproject.toml README.md ./
COPY longctx ./longctx
COPY models ./models
# The same set-up as the README, with PyTorch's CPU wheel index so that no CUDA packages are pulled.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -e ".[dev]"
WORKDIR /work
ENTRYPOINT ["longctx"]
CMD ["--help"]
