# syntax=docker/dockerfile:1
#
# The lbserver container image: the balancer (`lbserver serve`, the default
# command), the OAP registrar sidecar (`lbserver register ...`) and the agent
# sidecar (`agent-shim proxy ...`, with the entrypoint overridden).
#
#   docker build -t ghcr.io/lbserver/lbserver:0.1.0 .
#
# Two stages on the same pinned slim Python base: `build` installs the project
# and its dependencies (all from wheels) into a virtual environment; `runtime`
# gets only that environment, no pip, setuptools or compiler, and runs as an
# unprivileged user (uid 10001) on a filesystem that may be mounted read-only
# (bytecode is compiled at build time, nothing is written at run time).
# tests/chart/test_dockerfile.py checks these properties statically.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lbserver ./lbserver
COPY agent_shim ./agent_shim
# A venv without pip of its own: the build stage's pip installs into it.
RUN python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install --compile ".[kubernetes]" \
    && /opt/venv/bin/lbserver --version \
    && /opt/venv/bin/agent-shim --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="lbserver" \
      org.opencontainers.image.description="Lookaside gRPC load balancer (grpclb) for SkyWalking OAP" \
      org.opencontainers.image.source="https://github.com/lbserver/lbserver" \
      org.opencontainers.image.licenses="Apache-2.0"
# No package managers or build tools in the final image; one unprivileged user.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
    && groupadd --system --gid 10001 lbserver \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin lbserver
COPY --from=build /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# 11810: gRPC (grpclb, Registry, Admin, health, reflection); 11811: /metrics.
EXPOSE 11810 11811
ENTRYPOINT ["lbserver"]
CMD ["serve"]
