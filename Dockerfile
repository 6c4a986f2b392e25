# The di-router proxy (neuron-proxy-server) alone: it needs no Neuron SDK, so it runs from a slim
# image next to vLLM containers on the Trainium host. See docs/launcher.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DI_ROUTER_HOST=0.0.0.0 \
    DI_ROUTER_PORT=8000 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY di_router ./di_router
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin router
USER router
WORKDIR /home/router

EXPOSE 8000
# slim has no curl. /health is liveness (200 while the router serves; /ready checks backends); the
# port follows DI_ROUTER_PORT (the router reads DI_ROUTER_<FLAG> too), so `-e` changes both.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['DI_ROUTER_PORT'] + '/health', timeout=2)"]

ENTRYPOINT ["neuron-proxy-server"]
CMD ["--host", "0.0.0.0"]
