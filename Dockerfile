# attnserve's server image. CPU by default:
#   docker build -t attnserve .
# CUDA (the base has no Python; it is installed below):
#   docker build -t attnserve:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# Run: docker run -p 8000:8000 -v /path/to/models:/models:ro -e MODEL=/models/NAME attnserve
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# torch comes from this index: CPU wheels by default (PyPI's default torch pulls gigabytes of CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# A venv on both bases: Ubuntu 24.04's system pip refuses global installs (PEP 668).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The user the server runs as (uid 1000). Ubuntu images already have uid 1000 (`ubuntu`): it is replaced.
RUN set -eux; \
    if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/venv; \
    if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi; \
    useradd --create-home --uid 1000 --shell /usr/sbin/nologin attnserve

# torch first, in its own layer: it is by far the biggest and changes least. On the CPU index it is pinned by
# constraints/cpu.txt (the version CI tests); on another index, that index's newest torch.
WORKDIR /src
COPY constraints/ constraints/
RUN set -eux; \
    case "$TORCH_INDEX_URL" in */cpu) pin="-c constraints/cpu.txt" ;; *) pin="" ;; esac; \
    pip install --upgrade pip; \
    pip install $pin --index-url "$TORCH_INDEX_URL" torch

# The project, non-editable, with its runtime dependencies only: the same list `make serve` installs, no extras (the
# installed torch satisfies its torch>=2.4, so pip keeps it).
COPY pyproject.toml README.md ./
COPY attnserve/ attnserve/
COPY engine/ engine/
COPY kernels/ kernels/
COPY server/ server/
COPY clients/ clients/
RUN pip install . && rm -rf build

COPY deploy/docker-entrypoint.sh /usr/local/bin/attnserve-entrypoint
RUN chmod 0755 /usr/local/bin/attnserve-entrypoint

# The built-in demo model (served when MODEL is empty). The installed package sits apart from the source tree, so
# the engine is told where the checkpoint is.
COPY models/demo/ /opt/attnserve/models/demo/
ENV ATTNSERVE_DEMO_MODEL=/opt/attnserve/models/demo

USER attnserve
ENV HOME=/home/attnserve
WORKDIR /home/attnserve
# The build fails here, not at `docker run`, if the server imports a package the runtime list lacks, or if the demo
# checkpoint is not where the engine looks.
RUN python -c "import server.serve; from engine.default_model import default_model_dir; print(default_model_dir())"

EXPOSE 8000
# python's urllib, since slim images have no curl; a 503 (engine dead, or draining) fails it too. The start
# period allows for loading a large model on CPU; the first success ends it early.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["/usr/local/bin/attnserve-entrypoint"]
