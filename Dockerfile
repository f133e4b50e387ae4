# entropy-steer for GPU hosts: vLLM's own CUDA image of the same pinned version, the project on
# top, a non-root user. Serve a model mounted at /models/model:
#   docker build -t entropy-steer .
#   docker run --gpus all --shm-size 1g -p 8000:8000 -v /path/to/hf-model:/models/model:ro \
#     -v steer-artifacts:/data -e STEER_API_KEY=... -e STEER_ADMIN_KEY=... entropy-steer
# Extra vLLM engine arguments go after the image name (e.g. --max-model-len 8192).
FROM vllm/vllm-openai:v0.32.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    STEER_MODEL=/models/model \
    STEER_ARTIFACTS_DIR=/data/artifacts \
    STEER_CACHE_DIR=/data/cache \
    STEER_PORT=8000

WORKDIR /opt/entropy-steer
COPY pyproject.toml README.md ./
COPY server ./server
COPY steering ./steering
COPY clients ./clients
# vLLM and torch come from the base image; the project adds its own small dependencies.
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 steer \
    && mkdir -p /data/artifacts /data/cache \
    && chown -R steer:steer /data

USER 10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['STEER_PORT']}/health\", timeout=4)"]
ENTRYPOINT ["steer", "serve", "--host", "0.0.0.0"]
