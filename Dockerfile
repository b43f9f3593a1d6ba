# The vqdiff server: `docker compose up` serves the embedded default model on :8000 (HTTP) and
# :50051 (gRPC). Mount other model folders (diffusers layout) and point VQDIFF_MODEL at them.
#
# Build arguments:
#   BASE       the Python base image (default python:3.11-slim; deploy/base-image.sh builds one
#              locally where no registry can be reached)
#   PIP_ARGS   extra pip arguments, e.g. "--find-links /wheels": the files of a .wheels/ folder in
#              the build context appear at /wheels while the packages install (a bind mount: they
#              never enter the image). How this project's CPU machines get torch without a download.
#   EXTRAS     package extras to install; "kernels" adds Triton for CUDA images
# Build secret (optional): ca_bundle, a CA bundle for pip during the build only, for networks
# whose TLS goes through an intercepting proxy (deploy/smoke_docker.sh passes one). The image never
# holds it. RUN --mount needs BuildKit: the default builder of Docker 23+ and of docker compose v2.
ARG BASE=python:3.11-slim

# the optional wheels: the build context's .wheels/ (empty when there is none)
FROM scratch AS wheels
COPY pyproject.toml .wheel[s] /wheels/

FROM ${BASE}
ARG PIP_ARGS=""
ARG EXTRAS="kernels"

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    VQDIFF_HOST=0.0.0.0
# the sources are built from /src; the server runs in /app, where no source folder shadows the package
WORKDIR /src

# dependencies first, read from pyproject.toml: a code change does not reinstall torch
COPY pyproject.toml ./
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels --mount=type=secret,id=ca_bundle \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && python -c "import tomllib, sys; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + [d for e in sys.argv[1].split(',') if e for d in p['optional-dependencies'][e]]))" \
       "${EXTRAS}" > /tmp/requirements.txt \
    && pip install ${PIP_ARGS} -r /tmp/requirements.txt && rm /tmp/requirements.txt

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
    && useradd --system --uid 10001 vqdiff
# (chmod: the files keep the build context's modes, which may be unreadable for uid 10001)
WORKDIR /app
USER vqdiff

EXPOSE 8000 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"
# SIGTERM drains (readiness 503, running requests finish within VQDIFF_GRACE_S), then exits 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["vqdiff"]
CMD ["serve"]
