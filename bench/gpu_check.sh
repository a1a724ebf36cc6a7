#!/usr/bin/env bash
# GPU check for graft, in one short run (under 9 minutes on one GPU; --quick under 6):
#
#   0. preflight (seconds): a Python that imports TensorFlow and graft's dependencies,
#      and, on a GPU run, a TensorFlow that sees the GPU; else one clear line, exit 3/4/5;
#   1. export a benchmark model (MobileNetV2 224x224, random weights);
#   2. placement: a loaded version's variables and ops land on GPU:0, memory growth
#      is on, and the device-memory reader sees the GPU (TensorFlow's placement log kept);
#   3. training: one epoch per phase of mixed-precision training of a small base on
#      synthetic PNG folders, and its export;
#   4. graft-serve on that trained version on the GPU and one request (its scores, and
#      graft_device_memory_bytes for GPU:0);
#   5. shared trunks (bench/shared_trunk.py, short): 1 and 8 heads on one MobileNetV2
#      trunk, sharing on against off, the mixed load whose target needs an accelerator;
#   6. the serving benchmark (bench/serve.py) on the model of step 1, with short loads.
# The most important checks run first; the benchmark gets the time that is left.
# Every step runs even if an earlier one failed (except one whose input is missing),
# and a final table gives each step's exit code and seconds.
#
# Time budget (BUDGET_S, seconds for the whole run; each step also has its own cap):
#   full 540 s, --quick 360 s; --cpu 1200 s and twice the step caps (no device time at
#   stake, and a small CPU is slow). Step caps: preflight 90 (+20 per interpreter
#   probed), export 90, placement 90, train 150, serve_trained 90, shared_trunks 240
#   (--quick 120), benchmark 300 (--quick 180); a step never runs past the budget, and
#   one that would get under 30 s is skipped. A timeout stops the step's whole process group (SIGKILL 10 s later).
#
# Outputs, all directly under $OUT when set (else a temporary folder, printed at the
# end), at most 8 files, big logs cut to a few MiB: preflight.txt, summary.txt,
# gpu_check.log, placement.log, train.log, serve_trained.log, benchmarks_gpu.md (both
# benchmarks' sections), serve_gpu.json.
#
# Exit codes: 0 every step passed; 1 a step failed, timed out or was skipped;
# 2 bad option; 3 no Python here imports TensorFlow (install graft with its [gpu]
# extra, pip install -e '.[gpu]', or use its Docker image); 4 TensorFlow sees no GPU
# (GPU mode only); 5 TensorFlow is there but graft's other dependencies are not.
# Options:
#   --cpu    run everything on a machine without a GPU, expecting CPU placement
#            instead (to try the script itself; no GPU assertion is made)
#   --quick  smaller benchmarks (serving: MobileNetV3Small 96x96, C=1,8, 2 s loads;
#            shared trunks: bench/shared_trunk.py --quick)
# Environment: PYTHON (interpreter; default .venv/bin/python if it has TensorFlow,
# else python3), OUT, BUDGET_S.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=gpu
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    --quick) QUICK=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

if [[ "$QUICK" == 1 ]]; then
  BASE=mobilenet_v3_small; SIZE=96; BENCH=(--duration 2 --warmup 0.5 --ceiling-seconds 1 --concurrency 1,8)
  SHARED=(--quick)
  BUDGET_DEFAULT=360; BENCH_CAP=180; SHARED_CAP=120
else
  BASE=mobilenet_v2; SIZE=224; BENCH=(--duration 2 --warmup 1 --ceiling-seconds 1.5 --concurrency 1,8,32)
  # Heads trained on 3 digits per class for 2 epochs: the loads' figures do not depend on their accuracy.
  SHARED=(--bases mobilenet_v2:96:none --models 1,8 --rounds 1 --duration 5 --per-class 3 --head-epochs 2 --prefix '')
  BUDGET_DEFAULT=540; BENCH_CAP=300; SHARED_CAP=240
fi
SCALE=1  # step caps x SCALE
if [[ "$MODE" == cpu ]]; then BUDGET_DEFAULT=1200; SCALE=2; fi
BUDGET="${BUDGET_S:-$BUDGET_DEFAULT}"
MIN_STEP_S=30
LOG_CAP=8000000        # bytes of gpu_check.log
FILE_HEAD=3000000      # other logs: their first 3 MB and last 1 MB
FILE_TAIL=1000000

OUT="${OUT:-$(mktemp -d -t graft-gpu-check-XXXXXX)}"
mkdir -p "$OUT"
WORK="$(mktemp -d -t graft-gpu-work-XXXXXX)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}" KERAS_BACKEND=tensorflow
# Everything printed goes to the console and to gpu_check.log (cut at the end, like the
# other logs, if it grew big; the steps' own long output goes to their own logs).
: > "$OUT/gpu_check.log"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
LOGGER=$!
finish() {
  local code=$?
  rm -rf "$WORK"
  exec >&- 2>&-
  wait "$LOGGER" 2>/dev/null || sleep 1
  local size
  size=$(wc -c < "$OUT/gpu_check.log")
  if (( size > LOG_CAP )); then
    { head -c $((LOG_CAP / 2)) "$OUT/gpu_check.log"; printf '\n[... %d bytes cut ...]\n' $((size - LOG_CAP))
      tail -c $((LOG_CAP / 2)) "$OUT/gpu_check.log"; } > "$OUT/gpu_check.log.cut"
    mv "$OUT/gpu_check.log.cut" "$OUT/gpu_check.log"
  fi
  exit "$code"
}
trap finish EXIT

START=$SECONDS
DEADLINE=$((START + BUDGET))
banner() { echo; echo "=== [$((SECONDS - START))s] $*"; }

# cap SRC DST: copy a log, keeping its head and tail when it is big.
cap() {
  local src=$1 dst=$2 size
  [[ -f "$src" ]] || return 0
  size=$(wc -c < "$src")
  if (( size <= FILE_HEAD + FILE_TAIL )); then cp "$src" "$dst"; return 0; fi
  { head -c "$FILE_HEAD" "$src"; printf '\n[... %d bytes cut ...]\n' $((size - FILE_HEAD - FILE_TAIL))
    tail -c "$FILE_TAIL" "$src"; } > "$dst"
}

# ------------------------------------------------------------------ 0. preflight
# Fast first: which interpreter has TensorFlow at all (no import, well under a second),
# so that a machine without it answers in seconds.
banner "0. preflight (mode $MODE, budget ${BUDGET}s)"
GPUS_SMI="none (nvidia-smi not found)"
if command -v nvidia-smi >/dev/null; then
  GPUS_SMI="$(timeout 20 nvidia-smi -L 2>&1 | paste -sd ';' - || true)"
  GPUS_SMI="${GPUS_SMI:-none listed}"
fi
if [[ -n "${PYTHON:-}" ]]; then CANDIDATES=("$PYTHON")
else CANDIDATES=("$ROOT/.venv/bin/python" "$(command -v python3 || echo python3)"); fi
PY=""
FOUND=()
for cand in "${CANDIDATES[@]}"; do
  if ! [[ -x "$cand" ]] && ! command -v "$cand" >/dev/null; then
    FOUND+=("$cand: absent"); continue
  fi
  if answer=$(timeout 20 "$cand" -c 'import importlib.util as u, sys
print(sys.version.split()[0])
sys.exit(0 if u.find_spec("tensorflow") else 5)' 2>&1); then
    FOUND+=("$cand: Python $answer, has tensorflow"); PY="$cand"; break
  else
    code=$?
    if [[ $code == 5 ]]; then FOUND+=("$cand: Python $answer, no tensorflow")
    else FOUND+=("$cand: does not run (exit $code: $(tail -n 1 <<<"$answer"))"); fi
  fi
done
FOUND_TEXT="$(printf '%s; ' "${FOUND[@]}")"; FOUND_TEXT="${FOUND_TEXT%; }"

STEPS=(); RCS=(); TIMES=(); LIMITS=(); NOTES=()
write_summary() {
  {
    printf '%-14s %-5s %8s %8s  %s\n' step rc seconds limit note
    local i
    for i in "${!STEPS[@]}"; do
      printf '%-14s %-5s %8s %8s  %s\n' "${STEPS[$i]}" "${RCS[$i]}" "${TIMES[$i]}" "${LIMITS[$i]}" "${NOTES[$i]}"
    done
    echo "total $((SECONDS - START))s of a ${BUDGET}s budget; mode $MODE, quick $QUICK"
  } > "$OUT/summary.txt"
}
record() {  # name rc seconds limit note
  STEPS+=("$1"); RCS+=("$2"); TIMES+=("$3"); LIMITS+=("$4"); NOTES+=("$5")
  write_summary
}
preflight_fail() {  # code message
  echo "gpu_check: $2" | tee -a "$OUT/preflight.txt"
  record preflight "$1" $((SECONDS - START)) 90 "$2"
  exit "$1"
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "mode: $MODE, quick: $QUICK, budget: ${BUDGET}s"
  echo "interpreters: $FOUND_TEXT"
  echo "nvidia-smi -L: $GPUS_SMI"
} > "$OUT/preflight.txt"
if [[ -z "$PY" ]]; then
  preflight_fail 3 "NO TENSORFLOW on this machine: no Python here can import tensorflow ($FOUND_TEXT); GPUs: $GPUS_SMI. Run this on an image with graft's [gpu] extra installed (pip install -e '.[gpu]') or graft's Docker image; see docs/benchmarks.md."
fi

set +e
INFO=$(timeout -k 5 90 "$PY" - "$MODE" <<'EOF' 2>&1
import platform, sys
mode = sys.argv[1]
print("python:", sys.executable, platform.python_version())
try:
    import tensorflow as tf
except Exception as exc:  # a broken install: say so in one line
    print(f"FAIL 3 tensorflow does not import: {type(exc).__name__}: {exc}".replace("\n", " "))
    sys.exit(3)
print("tensorflow:", tf.__version__, "built with CUDA:", tf.test.is_built_with_cuda())
gpus = tf.config.list_physical_devices("GPU")
print("GPUs TensorFlow sees:", [g.name for g in gpus] or "none")
try:
    import serving.runtime.main, training.cli  # noqa: F401  (graft and its dependencies)
except ImportError as exc:
    print(f"FAIL 5 graft's dependencies are missing ({exc}); install graft with its [gpu] extra")
    sys.exit(5)
if mode == "gpu" and not gpus:
    print("FAIL 4 TensorFlow sees no GPU: check the driver and the CUDA libraries of tensorflow[and-cuda]")
    sys.exit(4)
print("preflight OK")
EOF
)
CODE=$?
set -e
# Its own lines only (TensorFlow's start-up noise stays out), and the tail if it failed.
printf '%s\n' "$INFO" | grep -E '^(python|tensorflow|GPUs TensorFlow sees|preflight OK)' \
  | tee -a "$OUT/preflight.txt" || true
if [[ $CODE -ne 0 ]]; then
  printf '%s\n' "$INFO" | grep -vE '^(FAIL |python|tensorflow|GPUs TensorFlow sees)' | tail -n 10 \
    | tee -a "$OUT/preflight.txt" || true
  REASON="$(grep -m1 '^FAIL ' <<<"$INFO" | cut -d' ' -f3- || true)"
  [[ $CODE == 124 || $CODE == 137 ]] && REASON="importing tensorflow took over 90 s"
  [[ $CODE == 3 || $CODE == 4 || $CODE == 5 ]] || CODE=3
  preflight_fail "$CODE" "${REASON:-the preflight failed (exit $CODE): $(tail -n 1 <<<"$INFO")} (python $PY; GPUs: $GPUS_SMI)"
fi
record preflight 0 $((SECONDS - START)) 90 "$(grep -m1 '^tensorflow:' <<<"$INFO" || true)"
DEVICE=""
if [[ "$MODE" == gpu ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 || true)"
fi

# ------------------------------------------------------------------ the steps
# run_step NAME CAP FUNCTION: runs FUNCTION under set -e in a subshell, at most CAP
# seconds and never past the budget; records its exit code and time. Inside, `t CMD`
# runs CMD with the step's remaining time (timeout's exit code 124 when it runs out).
run_step() {
  local name=$1 cap=$(($2 * SCALE)) fn=$3 left limit t0 rc
  left=$((DEADLINE - SECONDS)); limit=$(( cap < left ? cap : left ))
  if (( limit < MIN_STEP_S )); then
    banner "$name: skipped, ${left}s left of the ${BUDGET}s budget"
    record "$name" skip 0 0 "skipped: ${left}s left of the budget"
    return 0
  fi
  banner "$name (at most ${limit}s)"
  t0=$SECONDS
  set +e
  ( set -e; STEP_END=$((SECONDS + limit)); "$fn" )
  rc=$?
  set -e
  local note=ok
  if [[ $rc == 124 || $rc == 137 ]]; then note="timed out after ${limit}s"
  elif [[ $rc != 0 ]]; then note="failed"; fi
  echo "--- $name: exit $rc in $((SECONDS - t0))s ($note)"
  record "$name" "$rc" $((SECONDS - t0)) "$limit" "$note"
}
t() {
  local left=$((STEP_END - SECONDS))
  (( left > 0 )) || return 124
  timeout -k 10 "$left" "$@"
}
passed() {  # passed NAME: did step NAME exit 0?
  local i
  for i in "${!STEPS[@]}"; do [[ "${STEPS[$i]}" == "$1" && "${RCS[$i]}" == 0 ]] && return 0; done
  return 1
}
needs() {  # needs NAME STEP: record STEP as skipped unless NAME passed
  passed "$1" && return 0
  banner "$2: skipped, $1 did not pass"
  record "$2" skip 0 0 "skipped: $1 did not pass"
  return 1
}

step_export() {
  t "$PY" - "$WORK/repo" "$BASE" "$SIZE" <<'EOF'
import pathlib, sys
sys.path.insert(0, "bench")
import serve  # bench/serve.py: the same exporter as the benchmark

print("exported", serve.export_model(sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[1])))
EOF
}

step_placement() {
  local rc=0
  # TensorFlow logs placement only when asked before it initialises: graph ops to stdout,
  # eager ops to stderr; both go to placement.log (the whole log is read here, a cut
  # copy goes to $OUT).
  TF_CPP_MIN_LOG_LEVEL=0 t "$PY" - "$MODE" "$WORK/repo/bench" "$SIZE" > "$WORK/placement.log" 2>&1 <<'EOF' || rc=$?
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
  cap "$WORK/placement.log" "$OUT/placement.log"
  grep -E "variables on|device memory|PLACEMENT OK|Error|assert" "$WORK/placement.log" | tail -n 20 || true
  [[ $rc -eq 0 ]] || { echo "FAIL: the placement check exited $rc"; tail -n 15 "$WORK/placement.log"; return "$rc"; }
  # TensorFlow's own log of where each op of the model ran.
  local want convs other
  if [[ "$MODE" == gpu ]]; then want="device:GPU:0"; else want="device:CPU:0"; fi
  convs=$(grep -E "Conv2D" "$WORK/placement.log" | grep -c "$want" || true)
  other=$(grep -E "Conv2D" "$WORK/placement.log" | grep -v "$want" | grep -c "device:" || true)
  echo "Conv2D ops placed on $want: $convs, elsewhere: $other"
  [[ "$convs" -gt 0 && "$other" -eq 0 ]] || { echo "FAIL: convolutions not on $want"; return 1; }
}

step_train() {
  t "$PY" - "$WORK/images" <<'EOF'
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
  local rc=0
  t "$PY" -m training.cli fit --data "$WORK/images" --base mobilenet_v3_small --weights none \
    --scenario full --image-size 64 --head-epochs 1 --finetune-epochs 1 --batch-size 16 --mixed-precision \
    --repo "$WORK/trained" --model-name gpu_trained --run-dir "$WORK/run" > "$WORK/train.log" 2>&1 || rc=$?
  cap "$WORK/train.log" "$OUT/train.log"
  tail -n 5 "$WORK/train.log"
  [[ $rc -eq 0 ]] || { echo "FAIL: graft-train fit exited $rc"; return "$rc"; }
  grep -q '"mixed_precision": true' "$WORK"/run/*.json 2>/dev/null || grep -rq '"mixed_precision": true' "$WORK/run" \
    || { echo "FAIL: the run report does not record mixed precision"; return 1; }
  echo "trained version: $(tail -n 1 "$WORK/train.log")"
}

step_serve_trained() {
  local rc=0
  t "$PY" - "$MODE" "$WORK/trained/gpu_trained" "$WORK/images/blobs/00.png" "$WORK/serve_trained.log" <<'EOF' || rc=$?
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
  cap "$WORK/serve_trained.log" "$OUT/serve_trained.log"
  [[ $rc -eq 0 ]] || { echo "FAIL: serving the trained version exited $rc"; tail -n 15 "$WORK/serve_trained.log" || true; }
  return "$rc"
}

step_shared_trunks() {
  local rc=0
  t "$PY" bench/shared_trunk.py "${SHARED[@]}" --work "$WORK/shared" --out "$OUT/benchmarks_gpu.md" \
    > "$WORK/shared_trunk.log" 2>&1 || rc=$?
  # Its figures and targets (the log's end); TensorFlow's start-up noise stays out.
  grep -vE '^(I0000|W0000|WARNING|E0000)' "$WORK/shared_trunk.log" | tail -n 40 || true
  [[ $rc -eq 0 ]] || echo "FAIL: bench/shared_trunk.py exited $rc"
  return "$rc"
}

step_benchmark() {
  cat > "$WORK/gpu_batching.txt" <<'EOF'
max_batch_size { value: 64 }
batch_timeout_micros { value: 1000 }
max_enqueued_batches { value: 64 }
num_batch_threads { value: 2 }
EOF
  local batching=()
  # On a GPU the model's threads are not the bottleneck: TensorFlow's default threads,
  # not pinned to one CPU, and no switch-interval server (the frozen and unfrozen
  # graphs are both driven, and the baseline).
  [[ "$MODE" == gpu ]] && batching=(--batching-file "$WORK/gpu_batching.txt" --threads 0,0 --tensorflow-cpus 0
                                    --switch-interval-micros 0)
  t "$PY" bench/serve.py --model-dir "$WORK/repo/bench" "${BENCH[@]}" "${batching[@]}" \
    --out "$OUT/benchmarks_gpu.md" --json "$OUT/serve_gpu.json" ${DEVICE:+--device "$DEVICE"}
}

# Not `needs X && run_step`: set -e would be off inside run_step's subshell there.
run_step export 90 step_export
if needs export placement; then run_step placement 90 step_placement; fi
run_step train 150 step_train
if needs train serve_trained; then run_step serve_trained 90 step_serve_trained; fi
run_step shared_trunks "$SHARED_CAP" step_shared_trunks
if needs export benchmark; then run_step benchmark "$BENCH_CAP" step_benchmark; fi

banner "done in $((SECONDS - START))s (budget ${BUDGET}s); outputs in $OUT"
ls -la "$OUT"
echo
cat "$OUT/summary.txt"
for rc in "${RCS[@]}"; do
  [[ "$rc" == 0 ]] || { echo "gpu_check: FAILED (see the table above)"; exit 1; }
done
echo "gpu_check: all steps passed"
