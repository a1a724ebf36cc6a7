# syntax=docker/dockerfile:1
#
# Graft container images, two targets built from one wheel:
#
#   docker build --target serving  -t graft-serving:0.1.0  .
#   docker build --target training -t graft-training:0.1.0 .
#   docker build --target console  -t graft-console:0.1.0  .
#
# CPU-only images (no CUDA wheels, a few GB smaller):
#   docker build --target serving --build-arg GRAFT_SERVING_EXTRAS= -t graft-serving:0.1.0-cpu .
#
# Every Python package comes from uv.lock at its locked version, hashes checked.
#
# The base is NVIDIA's CUDA "base" flavour, pinned by version. It carries what the
# NVIDIA container toolkit looks for (NVIDIA_VISIBLE_DEVICES,
# NVIDIA_DRIVER_CAPABILITIES) and nothing more: the CUDA and cuDNN libraries come
# from the tensorflow[and-cuda] wheels (the `gpu` extra), which pin exactly the
# versions TensorFlow 2.21 was built against (CUDA 12.5+, cuDNN 9.3+), so a
# second copy in the base image would only add size and a chance of mismatch.
# The same image runs on CPU nodes; TensorFlow then logs that no GPU was found.

FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS os

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 24.04 ships Python 3.12 (Graft needs >= 3.11). tini is PID 1 in both
# images: it forwards SIGTERM to graft-serve (TF Serving's shell entrypoint
# swallows it, tensorflow/serving#1853) and reaps zombies.
# DL3008 (pin apt versions) is ignored on purpose: the base tag already pins the
# Ubuntu release, and Ubuntu removes superseded package versions from its archive,
# so exact pins would break every rebuild after the next security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 graft \
 && useradd --system --uid 10001 --gid graft --create-home --home-dir /home/graft \
      --shell /usr/sbin/nologin graft

# The base image asks the NVIDIA runtime for a driver that supports its own CUDA
# (12.8). TensorFlow's wheels carry CUDA 12.5 and run on any CUDA 12 driver
# (>= 525.60.13, per TensorFlow's install guide), so only that is required.
ENV NVIDIA_REQUIRE_CUDA="cuda>=12.0" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1


# ---- the wheel and the locked requirements: built once, installed into each target ----
FROM os AS wheel
WORKDIR /src
COPY pyproject.toml README.md uv.lock ./
COPY graft ./graft
COPY serving ./serving
COPY training ./training
COPY console ./console
# The extras each image carries, as uv export flags (empty for a CPU-only serving
# image). uv turns uv.lock into one pip requirements file per image, every line
# pinned to its locked version with its hashes.
ARG GRAFT_SERVING_EXTRAS="--extra gpu"
ARG GRAFT_TRAINING_EXTRAS="--extra gpu --extra demo"
ARG UV_VERSION=0.13.9
# SC2086 (quote expansions) is ignored on purpose: the extras variables are
# left unquoted so that each one splits into its several --extra flags.
# hadolint ignore=SC2086
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir "uv==${UV_VERSION}" \
 && /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && /opt/build/bin/uv export --frozen --no-dev --no-emit-project --format requirements-txt \
      ${GRAFT_SERVING_EXTRAS} --output-file /wheels/serving.txt \
 && /opt/build/bin/uv export --frozen --no-dev --no-emit-project --format requirements-txt \
      ${GRAFT_TRAINING_EXTRAS} --output-file /wheels/training.txt


# ---- one virtualenv per target: the locked requirements (hashes checked), then the wheel ----
FROM os AS serving-env
COPY --from=wheel /wheels /wheels
# The wheel's file name holds the version; the glob keeps this line version-free.
RUN python3 -m venv /opt/graft \
 && /opt/graft/bin/pip install --no-cache-dir --require-hashes --no-deps -r /wheels/serving.txt \
 && set -- /wheels/graft-*.whl \
 && /opt/graft/bin/pip install --no-cache-dir --no-deps "$1"

FROM os AS training-env
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/graft \
 && /opt/graft/bin/pip install --no-cache-dir --require-hashes --no-deps -r /wheels/training.txt \
 && set -- /wheels/graft-*.whl \
 && /opt/graft/bin/pip install --no-cache-dir --no-deps "$1"


# ---- target: serving (graft-serve) ----
FROM os AS serving
COPY --from=serving-env /opt/graft /opt/graft
COPY --chmod=0755 docker/serve-entrypoint.sh /usr/local/bin/graft-serve-entrypoint
# TF Serving's image variables: `docker run -e MODEL_NAME=pets -v .../pets:/models/pets`
# serves pets from /models/pets. TF_CPP_MIN_LOG_LEVEL stays unset: graft-serve then keeps
# TensorFlow's own log lines quiet (docs/flags.md; `-e TF_CPP_MIN_LOG_LEVEL=0` shows them).
ENV PATH=/opt/graft/bin:$PATH \
    MODEL_NAME=model \
    MODEL_BASE_PATH=/models \
    GRAFT_SERVE_ARGS_FILE=/tmp/graft-serve.args
USER 10001:10001
WORKDIR /home/graft
EXPOSE 8500 8501
# /healthz answers while the process is alive (readiness is /readyz, for Kubernetes).
# The probe reads the command line the entrypoint wrote, with graft-serve's own parser,
# so it follows --rest_api_port (and HTTPS, and the gRPC port when REST is off); it runs
# on the image's Python, so no curl is needed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-m", "serving.runtime.probe"]
# The entrypoint runs graft-serve as TF Serving's image runs its server:
#   graft-serve --host=0.0.0.0 --port=8500 --rest_api_port=8501 --model_name=$MODEL_NAME
#               --model_base_path=$MODEL_BASE_PATH/$MODEL_NAME "$@"
# and `docker run IMAGE --flag=...` appends flags (the last of a repeated flag wins).
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/graft-serve-entrypoint"]
CMD []


# ---- target: training (graft-train) ----
FROM os AS training
COPY --from=training-env /opt/graft /opt/graft
ENV PATH=/opt/graft/bin:$PATH \
    MPLCONFIGDIR=/tmp/matplotlib \
    TF_CPP_MIN_LOG_LEVEL=1
USER 10001:10001
WORKDIR /home/graft
# `tini -g` signals the whole process group, so that a shell wrapper (the k8s
# retrain loop) and the graft-train it runs both receive SIGTERM.
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "graft-train"]
CMD ["--help"]


# ---- target: console (graft-console) ----
# The serving image's virtualenv (Flask and waitress are main dependencies): the
# two images share that layer, and the promote action finds TensorFlow for its gate.
FROM os AS console
COPY --from=serving-env /opt/graft /opt/graft
ENV PATH=/opt/graft/bin:$PATH \
    HOME=/tmp
USER 10001:10001
WORKDIR /home/graft
EXPOSE 8502
# /healthz on the console's default port, through the image's Python (no curl there).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8502/healthz', timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "graft-console"]
CMD ["--repo", "/models"]
