# chatstream production image: `chatstream serve` by default; `migrate` and `consume` are the
# other commands (docs/deployment.md). Build from the repository root: `docker build -t chatstream .`

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with the SDK and the server, no dev or embedded extras ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/chatstream
WORKDIR /src
# The SDK first: it changes less often than the server, so its layer is reused more.
COPY clients/python/ clients/python/
COPY pyproject.toml README.md ./
COPY server/ server/
# Both in one command, so pip takes chatstream-client from ./clients/python, never from an index.
# --only-binary: every dependency ships manylinux wheels for CPython 3.11, so no compiler is needed.
RUN /opt/chatstream/bin/pip install --only-binary=:all: ./clients/python . \
 && /opt/chatstream/bin/pip uninstall --yes pip setuptools
COPY deploy/healthcheck.py /opt/chatstream/healthcheck.py

# ---- runtime: the same base, the virtual environment, nothing else ----
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 chatstream \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin chatstream
COPY --from=build /opt/chatstream /opt/chatstream
ENV PATH=/opt/chatstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHATSTREAM_LISTEN=0.0.0.0:50051
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051
# The server stops gracefully on SIGTERM: health NOT_SERVING, in-flight streams get
# CHATSTREAM_SHUTDOWN_GRACE_S, then pools close. chatstream is PID 1 and installs its own
# handlers, so no init process is needed for signals.
STOPSIGNAL SIGTERM
# Meaningful for `serve` only: compose disables it for `migrate` and `consume`.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/opt/chatstream/healthcheck.py"]
ENTRYPOINT ["chatstream"]
CMD ["serve"]
