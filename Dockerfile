# The vqdiff image: one binary for every role (`vqdiff serve`, `--role api`, `--role worker`).
# docker-compose.yml runs the scale-out stack from it; mount model folders (diffusers layout) and
# point VQDIFF_MODEL at them.
#
# Build arguments:
#   BASE         the Python base image (default python:3.11-slim; deploy/base-image.sh builds one
#                locally where no registry can be reached)
#   TORCH_INDEX  an extra package index for torch: default the CPU builds (a CPU image without
#                ~15 nvidia/CUDA wheels); "" takes torch from PyPI, whose Linux build is the CUDA one
#   PIP_ARGS     extra pip arguments, e.g. "--find-links /wheels": the files of a .wheels/ folder in
#                the build context appear at /wheels while the packages install (a bind mount: they
#                never enter the image). How this project's CPU machines get torch without a download.
#   EXTRAS       package extras, comma-separated; "kernels" adds Triton for CUDA images; "none": none
#   SYSTEM_PACKAGES  Debian packages to add, e.g. "gcc libc6-dev" (Triton compiles a small C driver
#                on first use: GPU images need a compiler)
# Build secret (optional): ca_bundle, a CA bundle for pip during the build only, for networks
# whose TLS goes through an intercepting proxy (deploy/smoke_docker.sh passes one). The image never
# holds it. RUN --mount needs BuildKit: the default builder of Docker 23+ and of docker compose v2.
ARG BASE=python:3.11-slim

# the optional wheels: the build context's .wheels/ (empty when there is none)
FROM scratch AS wheels
COPY pyproject.toml .wheel[s] /wheels/

FROM ${BASE}
ARG PIP_ARGS=""
ARG EXTRAS="none"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ARG SYSTEM_PACKAGES=""

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    VQDIFF_HOST=0.0.0.0
RUN if [ -n "${SYSTEM_PACKAGES}" ]; then apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${SYSTEM_PACKAGES} \
        && rm -rf /var/lib/apt/lists/*; fi
# the sources are built from /src; the server runs in /app, where no source folder shadows the package
WORKDIR /src

# dependencies first, read from pyproject.toml: a code change does not reinstall torch
COPY pyproject.toml ./
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels --mount=type=secret,id=ca_bundle \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && python -c "import tomllib, sys; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + [d for e in sys.argv[1].split(',') if e not in ('', 'none') \
for d in p['optional-dependencies'][e]]))" "${EXTRAS}" > /tmp/requirements.txt \
    && pip install ${PIP_ARGS} ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# the package, with the embedded default model as package data (vqdiff.models)
COPY README.md ./
COPY model ./model
COPY server ./server
COPY kernels ./kernels
COPY vqdiff ./vqdiff
COPY proto ./proto
COPY models ./models
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels --mount=type=secret,id=ca_bundle \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && pip install ${PIP_ARGS} --no-deps . && rm -rf build vqdiff.egg-info models \
    && chmod -R a+rX "$(python -c 'import vqdiff, os; print(os.path.dirname(vqdiff.__file__))')" \
    && useradd --system --uid 10001 --create-home --home-dir /home/vqdiff vqdiff
# (chmod: the files keep the build context's modes, which may be unreadable for uid 10001; the home
# holds Triton's cache, ~/.triton)
WORKDIR /app
USER vqdiff
ENV HOME=/home/vqdiff

EXPOSE 8000 50051 8001
# /readyz of this container's role on the port its settings name (server/healthcheck.py)
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-m", "vqdiff.server.healthcheck"]
# SIGTERM drains (readiness 503, running requests finish within VQDIFF_GRACE_S), then exits 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["vqdiff"]
CMD ["serve"]
