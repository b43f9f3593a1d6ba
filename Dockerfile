# Minimal image: the model core and the `vqdiff` command. The server arrives with issue 5.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
COPY kernels ./kernels
COPY vqdiff ./vqdiff
RUN pip install --no-cache-dir .
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ENTRYPOINT ["vqdiff"]
CMD ["--help"]
