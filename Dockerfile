# lb: a self-optimizing HTTP load balancer.
#   docker build -t lb .
#   docker run --rm -p 8080:8080 -p 9900:9900 -e LB_ADMIN_TOKEN=secret \
#       -v $PWD/lb.toml:/etc/lb/lb.toml:ro lb run -c /etc/lb/lb.toml -w 4
# A config used in a container must listen on 0.0.0.0 (as configs/docker.toml,
# the default, does); the admin port serves /api/health for the HEALTHCHECK.
# HTTPS: a config with [tls] (configs/tls.toml), its certificates mounted
# read-only, and the TLS port published too; renew with `docker kill -s HUP`:
#   docker run --rm -p 80:80 -p 443:443 -v $PWD/tls.toml:/etc/lb/lb.toml:ro \
#       -v /etc/lb/tls:/etc/lb/tls:ro lb
# (listening on ports below 1024 as the unprivileged user needs
#  --sysctl net.ipv4.ip_unprivileged_port_start=0, or use 8080/8443).

# Build stage: the wheel, with the C fast path (workers/_fastpath*.c) compiled.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lb ./lb
COPY workers ./workers
COPY inference ./inference
RUN pip wheel --no-deps --wheel-dir /wheels .

# Runtime stage: no compiler.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
# The fast path must be in the image: fail the build if it is not.
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && python -c "from workers import fastpath; assert fastpath.AVAILABLE, 'no C fast path'"

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin lb \
    && mkdir -p /etc/lb
COPY configs/docker.toml /etc/lb/lb.toml

USER lb
EXPOSE 8080 9900
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request\ntry:\n    urllib.request.urlopen('http://127.0.0.1:9900/api/health', timeout=2)\nexcept Exception:\n    sys.exit(1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lb"]
CMD ["run", "-c", "/etc/lb/lb.toml"]
