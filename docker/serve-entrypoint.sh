#!/bin/sh
# The serving image's entrypoint: graft-serve as tensorflow/serving's image starts
# tensorflow_model_server, so the same `docker run` lines work:
#
#   docker run -e MODEL_NAME=pets -v "$PWD/pets:/models/pets" graft-serving
#
# serves the model `pets` from /models/pets ($MODEL_BASE_PATH/$MODEL_NAME;
# MODEL_NAME defaults to "model", MODEL_BASE_PATH to /models), and arguments after
# the image name are appended to the command line. Where a flag is given twice the
# last one wins (e.g. --rest_api_port=9000), and --model_config_file replaces the
# single model, as in TF Serving.
#
# The final command line is written to $GRAFT_SERVE_ARGS_FILE (NUL-separated) for
# the image's HEALTHCHECK (python3 -m serving.runtime.probe), which thus asks the
# REST port graft-serve was really given. Then this script becomes graft-serve
# (exec), so that tini's SIGTERM reaches it and it drains.
set -eu

MODEL_NAME="${MODEL_NAME:-model}"
MODEL_BASE_PATH="${MODEL_BASE_PATH:-/models}"
args_file="${GRAFT_SERVE_ARGS_FILE:-/tmp/graft-serve.args}"

set -- --host=0.0.0.0 --port=8500 --rest_api_port=8501 \
    "--model_name=${MODEL_NAME}" "--model_base_path=${MODEL_BASE_PATH}/${MODEL_NAME}" "$@"

# Not fatal: on a read-only file system the health check falls back to port 8501.
if ! (printf '%s\0' "$@" > "${args_file}.tmp" && mv -f "${args_file}.tmp" "${args_file}") 2>/dev/null; then
    echo "serve-entrypoint: cannot write ${args_file}; the health check assumes REST on port 8501" >&2
fi

exec graft-serve "$@"
