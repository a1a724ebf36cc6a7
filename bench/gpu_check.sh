#!/usr/bin/env bash
# GPU check for graft, in one short run (under 8 minutes on one GPU):
#
#   1. placement: a loaded version's variables and ops land on GPU:0, memory growth
#      is on, and the device-memory reader sees the GPU (TensorFlow's placement log kept);
#   2. the serving benchmark (bench/serve.py) with a 224x224 MobileNetV2 and short loads;
#   3. training: one epoch per phase of mixed-precision training of a small base on
#      synthetic PNG folders, an export, then graft-serve on that version on the GPU
#      and one request (its scores, and graft_device_memory_bytes for GPU:0).
#
# Outputs go to $OUT when set (else a temporary folder, printed at the end), at most
# 8 files: gpu_check.log, placement.log, benchmarks_gpu.md, serve_gpu.json,
# train.log, serve_trained.log.
#
# Needs a Python with graft's dependencies and a TensorFlow that sees the GPU
# (pip install -e '.[gpu]'); it checks that first and stops within seconds if not.
# Options:
#   --cpu    run everything on a machine without a GPU, expecting CPU placement
#            instead (to try the script itself; no GPU assertion is made)
#   --quick  smaller benchmark (MobileNetV3Small 96x96, C=1,8, 2 s loads)
# Environment: PYTHON (interpreter; default .venv/bin/python, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=gpu
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3)"; fi
OUT="${OUT:-$(mktemp -d -t graft-gpu-check-XXXXXX)}"
mkdir -p "$OUT"
WORK="$(mktemp -d -t graft-gpu-work-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}" KERAS_BACKEND=tensorflow
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

START=$SECONDS
step() { echo; echo "=== [$((SECONDS - START))s] $*"; }

step "0. prerequisites ($PY, mode $MODE)"
timeout 120 "$PY" - "$MODE" <<'EOF'
import sys
mode = sys.argv[1]
try:
    import tensorflow as tf
    import serving.main, training.cli  # noqa: F401  (graft and its dependencies)
except ImportError as exc:
    sys.exit(f"missing dependency: {exc}. Install graft with its [gpu] extra first.")
gpus = tf.config.list_physical_devices("GPU")
print("tensorflow", tf.__version__, "built with CUDA:", tf.test.is_built_with_cuda(), "GPUs:", gpus)
if mode == "gpu" and not gpus:
    sys.exit("TensorFlow sees no GPU: check the driver and the CUDA libraries of tensorflow[and-cuda]")
EOF
if [[ "$MODE" == gpu ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
else
  DEVICE=""
fi

if [[ "$QUICK" == 1 ]]; then
  BASE=mobilenet_v3_small; SIZE=96; BENCH=(--duration 2 --warmup 0.5 --ceiling-seconds 1 --concurrency 1,8)
else
  BASE=mobilenet_v2; SIZE=224; BENCH=(--duration 3 --warmup 1 --ceiling-seconds 2 --concurrency 1,8,32)
fi

step "1. export $BASE ${SIZE}x${SIZE} (random weights) and check placement"
timeout 120 "$PY" - "$WORK/repo" "$BASE" "$SIZE" <<'EOF'
import pathlib, sys
sys.path.insert(0, "bench")
import serve  # bench/serve.py: the same exporter as the benchmark

print("exported", serve.export_model(sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[1])))
EOF
# TensorFlow logs placement only when asked before it initialises: graph ops to stdout,
# eager ops to stderr; both go to placement.log.
TF_CPP_MIN_LOG_LEVEL=0 timeout 120 "$PY" - "$MODE" "$WORK/repo/bench" "$SIZE" > "$OUT/placement.log" 2>&1 <<'EOF'
import sys
mode, base_path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, "bench")
import numpy as np
import tensorflow as tf

tf.debugging.set_log_device_placement(True)
from serving import devices

# Memory settings first: they only apply before TensorFlow initialises the GPU.
placed_on = devices.configure_gpus(devices.GpuOptions())
expected = placed_on[0] if placed_on else "/device:CPU:0"
if mode == "gpu":
    assert placed_on and placed_on[0] == "/device:GPU:0", placed_on
    gpu = tf.config.list_physical_devices("GPU")[0]
    assert tf.config.experimental.get_memory_growth(gpu), "memory growth is off"
import serve
from serving.servable import Servable

version = serve.latest_version(__import__("pathlib").Path(base_path))
servable = Servable.load("bench", int(version.name), str(version), device=(expected,))
where = servable.variable_devices()[expected]
print("variables on:", where, flush=True)
assert where and all(d.endswith(expected.split("device:")[-1]) for d in where), where
images = np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype(np.float32)
out = servable.run("serving_default", {"images": images})
assert out["scores"].shape == (4, 10), out["scores"].shape
memory = devices.memory_reader(placed_on)()
print("device memory in use:", memory, flush=True)
if mode == "gpu":
    assert memory.get("GPU:0", 0) > 0, memory
print("PLACEMENT OK", expected, flush=True)
EOF
grep -E "variables on|device memory|PLACEMENT OK" "$OUT/placement.log"
# TensorFlow's own log of where each op of the model ran.
if [[ "$MODE" == gpu ]]; then WANT="device:GPU:0"; else WANT="device:CPU:0"; fi
CONVS=$(grep -E "Conv2D" "$OUT/placement.log" | grep -c "$WANT" || true)
OTHER=$(grep -E "Conv2D" "$OUT/placement.log" | grep -v "$WANT" | grep -c "device:" || true)
echo "Conv2D ops placed on $WANT: $CONVS, elsewhere: $OTHER"
[[ "$CONVS" -gt 0 && "$OTHER" -eq 0 ]] || { echo "FAIL: convolutions not on $WANT"; exit 1; }

step "2. serving benchmark ($BASE ${SIZE}x${SIZE})"
cat > "$WORK/gpu_batching.txt" <<'EOF'
max_batch_size { value: 64 }
batch_timeout_micros { value: 1000 }
max_enqueued_batches { value: 64 }
num_batch_threads { value: 2 }
EOF
BATCHING=()
# On a GPU the model's threads are not the bottleneck: TensorFlow's default threads,
# not pinned to one CPU, and no switch-interval server (the frozen and unfrozen
# graphs are both driven, and the baseline).
[[ "$MODE" == gpu ]] && BATCHING=(--batching-file "$WORK/gpu_batching.txt" --threads 0,0 --tensorflow-cpus 0
                                  --switch-interval-micros 0)
timeout 300 "$PY" bench/serve.py --model-dir "$WORK/repo/bench" "${BENCH[@]}" "${BATCHING[@]}" \
  --out "$OUT/benchmarks_gpu.md" --json "$OUT/serve_gpu.json" ${DEVICE:+--device "$DEVICE"}

step "3. mixed-precision training on synthetic PNGs, export, serve on the device"
"$PY" - "$WORK/images" <<'EOF'
import sys, pathlib
import numpy as np
from PIL import Image
root = pathlib.Path(sys.argv[1])
rng = np.random.default_rng(0)
for c, name in enumerate(("stripes", "blobs")):
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(24):
        yy, xx = np.mgrid[0:64, 0:64]
        base = np.sin(xx / (2 + c * 5) + i) if c == 0 else np.exp(-((xx - 32) ** 2 + (yy - 32) ** 2) / (80 + 10 * i))
        rgb = np.clip(np.stack([base] * 3, -1) * 120 + 128 + rng.normal(0, 10, (64, 64, 3)), 0, 255)
        Image.fromarray(rgb.astype(np.uint8)).save(folder / f"{i:02d}.png")
print("wrote 48 PNGs under", root)
EOF
set +e
timeout 150 "$PY" -m training.cli fit --data "$WORK/images" --base mobilenet_v3_small --weights none \
  --scenario full --image-size 64 --head-epochs 1 --finetune-epochs 1 --batch-size 16 --mixed-precision \
  --repo "$WORK/trained" --model-name gpu_trained --run-dir "$WORK/run" > "$OUT/train.log" 2>&1
CODE=$?
set -e
tail -n 5 "$OUT/train.log"
[[ $CODE -eq 0 ]] || { echo "FAIL: graft-train fit exited $CODE"; exit 1; }
VERSION_DIR="$(tail -n 1 "$OUT/train.log")"
grep -q '"mixed_precision": true' "$WORK"/run/*.json 2>/dev/null || grep -rq '"mixed_precision": true' "$WORK/run" \
  || { echo "FAIL: the run report does not record mixed precision"; exit 1; }
echo "trained version: $VERSION_DIR"

timeout 120 "$PY" - "$MODE" "$WORK/trained/gpu_trained" "$WORK/images/blobs/00.png" "$OUT/serve_trained.log" <<'EOF'
import base64, json, sys, pathlib, urllib.request
sys.path.insert(0, "bench")
import common

mode, base_path, image, log_path = sys.argv[1:5]
server = common.ServerProcess(["--model_name", "gpu_trained", "--model_base_path", base_path],
                              pathlib.Path(log_path), common.free_port(), common.free_port(), sys.executable)
try:
    server.wait_ready()
    body = json.dumps({"instances": [{"b64": base64.b64encode(pathlib.Path(image).read_bytes()).decode()}]})
    request = urllib.request.Request(f"{server.rest}/v1/models/gpu_trained:predict", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        prediction = json.loads(answer.read())["predictions"][0]
    print("prediction:", prediction)
    scores = prediction["scores"]
    assert len(scores) == 2 and abs(sum(scores) - 1.0) < 1e-3, scores
    with urllib.request.urlopen(f"{server.rest}/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    memory = [line for line in metrics.splitlines() if line.startswith("graft_device_memory_bytes")]
    print("device memory metric:", memory or "absent")
    if mode == "gpu":
        assert any('device="GPU:0"' in line and float(line.rsplit(" ", 1)[1]) > 0 for line in memory), memory
        assert "GPU 0: memory growth on" in server.log(), "no GPU configuration in the server log"
finally:
    code = server.stop()
assert code == 0, f"graft-serve exited {code}"
print("SERVED OK")
EOF

step "done in $((SECONDS - START))s; outputs in $OUT"
ls -la "$OUT"
