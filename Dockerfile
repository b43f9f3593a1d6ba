# The vqdiff server: `docker compose up` serves the embedded default model on :8000 (HTTP) and
# :50051 (gRPC). Mount other model folders (diffusers layout) and point VQDIFF_MODEL at them.
#
# Build arguments:
#   BASE       the Python base image (default python:3.11-slim)
#   PIP_ARGS   extra pip arguments, e.g. "--find-links /wheels" with a wheels folder in the build
#              context (how this project's CPU machines get torch without a download)
#   EXTRAS     package extras to install; "kernels" adds Triton for CUDA images
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG PIP_ARGS=""
ARG EXTRAS="kernels"

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    VQDIFF_MODEL=/app/models/default VQDIFF_HOST=0.0.0.0
WORKDIR /app

# dependencies first: a code change does not reinstall torch
COPY pyproject.toml README.md ./
RUN mkdir -p model server kernels vqdiff && touch model/__init__.py server/__init__.py kernels/__init__.py vqdiff/__init__.py \
    && pip install ${PIP_ARGS} ".[${EXTRAS}]" && pip uninstall -y vqdiff

COPY model ./model
COPY server ./server
COPY kernels ./kernels
COPY vqdiff ./vqdiff
COPY proto ./proto
COPY models/default ./models/default
RUN pip install ${PIP_ARGS} --no-deps . && useradd --system --uid 10001 vqdiff
USER vqdiff

EXPOSE 8000 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"
# SIGTERM drains (readiness 503, running requests finish within VQDIFF_GRACE_S), then exits 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["vqdiff"]
CMD ["serve"]
