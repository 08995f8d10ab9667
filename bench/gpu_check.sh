#!/usr/bin/env bash
# One lean device check of the GPU path (issue 15), sized for the lent GPU machine: one H200,
# Python 3.12, torch + CUDA 13, onnx and the CPU onnxruntime; no diffusers, no TensorRT, no
# network; files arrive only with a `run` call (64 MiB a call, the working tree included), and
# 15 minutes of device time in all. At most seven calls, each retry-safe: every carried part is
# its own file with its own sha256, collected once; a stage run twice redoes only its work.
#
# Here, once:  bash bench/gpu_check.sh prepare     -> .gpucheck/ (`resplit` redoes only the split) (git-ignored: add /.gpucheck/
#              to .git/info/exclude): py/ (diffusers & co. wheels for cp312), ort.NN + ort.NN.sha256
#              (onnxruntime-gpu for cp312 repacked as one tar.xz, split so that every call
#              fills its CALL_MB: 64 MiB less the working tree, the first part less the py/ wheels),
#              ort.sha256 (the whole archive).
# There (the device tool's `run`, carry in brackets), one call each, back to back. With
# onnxruntime-gpu 1.31.1 (194 MiB as tar.xz -9e) beside a 23 MiB working tree that was five
# parts, one call each, the last one measuring; a retry costs a sixth call. With both toy
# worlds' bases committed the tree was 33 MiB and `resplit` made seven parts; with only
# iap_rt/data/toy_base (10 MiB) left it is 24 MiB (run `resplit` to see the count):
#   1. bash bench/gpu_check.sh start          [.gpucheck/py, .gpucheck/ort.00, .gpucheck/ort.00.sha256]
#      installs the wheels and the project into /tmp/iap/site and starts the SD 1.5 fp16
#      build + export in the background (it overlaps the next calls)
#   2.-6. bash bench/gpu_check.sh collect     [.gpucheck/ort.0N, .gpucheck/ort.0N.sha256]
#   7. bash bench/gpu_check.sh collect check  [the last part, its .sha256, .gpucheck/ort.sha256]
#      assembles + installs onnxruntime-gpu, then measures, writing $OUT/stageN.json after each:
#        (1) does ONNX Runtime's CUDA provider start, and its cold start (stage1.json)
#        (2) torch fp16 eager vs ort (IO binding, fused UNet): UNet step and end to end at
#            512x512, 50 steps, guidance on (stage2.json)
#        (3) ort-graph, CUDA graphs per network (stage3.json)
#        (4) only if time is left: exported-vs-fused UNet A/B and torch.compile (stage4_*.json)
#   (8.) bash bench/gpu_check.sh check        a retry: resumes at the first stage without a result
# A stage with a result file is not measured again. `collect` without new parts says which
# parts it still lacks. The check's budget is CHECK_BUDGET_S seconds (default 420) from the
# first measurement; stage 4 runs only if at least STAGE4_S (default 150) are left.
#
#   bash bench/gpu_check.sh --dry-run   rehearses every stage here on the CPU: the tiny model,
#   CPU providers, 2 steps, dummy parts of a stand-in archive (tests/integration runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY=0
if [[ ${1:-} == --dry-run ]]; then
  DRY=1
  shift
fi
if ((DRY)) && [[ ${1:-} != --stage ]]; then  # the rehearsal's own scratch root
  GPU_CHECK_ROOT=$(mktemp -d /tmp/gpu_check_dry.XXXX)
  export GPU_CHECK_ROOT OUT=$GPU_CHECK_ROOT/out
fi
ROOT=${GPU_CHECK_ROOT:-/tmp/iap}
CARRY=${GPU_CHECK_CARRY:-$REPO/.gpucheck}
SITE=$ROOT/site
CACHE=${GPU_CHECK_CACHE:-$ROOT/cache}
RESULTS=$ROOT/results
OUT=${OUT:-$ROOT/out}
CALL_MB=${CALL_MB:-64}   # what one call carries, the working tree included (MiB)
MAX_CALLS=7
ORT_VERSION=${ORT_VERSION:-1.31.1}
# what the SD 1.5 export needs beyond the machine's torch, transformers (+ safetensors), onnx
PY_WHEELS=${PY_WHEELS:-"diffusers==0.42.1 onnx-graphsurgeon==0.6.1"}
CHECK_BUDGET_S=${CHECK_BUDGET_S:-420}
STAGE4_S=${STAGE4_S:-150}
T_COMPILE=240
if ((DRY)); then  # the tiny model on the CPU: every stage, in seconds
  ARCH=(--arch tiny --device cpu --steps 2 --repeat 1 --threads 1)
  EXPORT_CFG="arch='tiny', fp16=False"
  T_COMPILE=${T_COMPILE_DRY:-20}  # torch.compile on a CPU takes minutes: rehearse the timeout
else
  ARCH=(--arch sd15 --fp16 --device cuda --height 512 --width 512 --steps 50 --repeat 3)
  EXPORT_CFG="arch='sd15', fp16=True"
fi
mkdir -p "$ROOT/parts" "$RESULTS" "$OUT"

log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$RESULTS/check.log" >&2; }

env_setup() {
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  # CUDA/cuDNN of torch's nvidia-* wheels, for onnxruntime-gpu in processes without torch
  local libs
  libs=$(python3 -c 'import glob, os, nvidia
print(":".join(sorted(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib")))))' \
    2>/dev/null || true)
  export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

# ---- here: the carried parts ----------------------------------------------------------------
split_parts() {  # ARCHIVE PART_BYTES FIRST_BYTES: ort.NN + ort.NN.sha256 + ort.sha256 in $CARRY
  local archive=$1 part=$2 first=$3
  rm -f "$CARRY"/ort.*
  (cd "$(dirname "$archive")" && sha256sum "$(basename "$archive")") | awk '{print $1"  ort.tar.xz"}' \
    >"$CARRY/ort.sha256"
  head -c "$first" "$archive" >"$CARRY/ort.00"  # the first call also carries the py/ wheels
  tail -c +"$((first + 1))" "$archive" | split -b "$part" -d --numeric-suffixes=1 - "$CARRY/ort."
  for p in "$CARRY"/ort.[0-9][0-9]; do
    (cd "$CARRY" && sha256sum "$(basename "$p")" >"$(basename "$p").sha256")
  done
  local n
  n=$(ls "$CARRY"/ort.[0-9][0-9] | wc -l)
  log "$n parts of $(du -m "$archive" | cut -f1) MB in $CARRY (one call each)"
  if ((n > MAX_CALLS)); then
    log "WARNING: $n calls exceed the check's $MAX_CALLS: shrink the working tree or the archive"
  fi
}

prepare() {
  mkdir -p "$CARRY/py" "$ROOT/prep"
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$CARRY/py" $PY_WHEELS
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$ROOT/prep" "onnxruntime-gpu==$ORT_VERSION"
  rm -rf "$ROOT/prep/x" && mkdir "$ROOT/prep/x"
  unzip -q "$ROOT"/prep/onnxruntime_gpu-*.whl -d "$ROOT/prep/x"  # a wheel is a zip of site-packages
  tar -C "$ROOT/prep/x" -cf - . | xz -T0 -9e >"$ROOT/prep/ort.tar.xz"
  resplit
}

resplit() {  # the archive into parts that fill each call (again after the working tree changed)
  # every call: CALL_MB less what travels anyway (tracked + untracked-not-ignored files, the
  # .sha256 files) less MARGIN_KB
  local tree py part
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb | tail -n 1 | cut -f1)
  py=$(du -cb "$CARRY"/py/*.whl | tail -n 1 | cut -f1)
  part=$((CALL_MB * 1048576 - tree - ${MARGIN_KB:-256} * 1024))
  log "working tree $((tree / 1024)) KiB, py wheels $((py / 1024)) KiB: parts of $((part / 1024)) KiB"
  split_parts "$ROOT/prep/ort.tar.xz" "$part" "$((part - py))"
}

# ---- there: collect, install, export ----------------------------------------------------------
collect() {  # every carried part whose checksum holds, once; say what is missing
  local n=0
  for p in "$CARRY"/ort.[0-9][0-9]; do
    [[ -f $p ]] || continue
    local name
    name=$(basename "$p")
    if [[ -f $ROOT/parts/$name ]]; then continue; fi
    if (cd "$CARRY" && sha256sum -c --quiet "$name.sha256"); then
      cp "$p" "$ROOT/parts/$name.tmp" && mv "$ROOT/parts/$name.tmp" "$ROOT/parts/$name"
      n=$((n + 1))
    else
      log "part $name is corrupt: carry it again"
    fi
  done
  if [[ -f $CARRY/ort.sha256 ]]; then cp "$CARRY/ort.sha256" "$ROOT/parts/"; fi
  log "collected $n new part(s); have: $(cd "$ROOT/parts" && ls ort.[0-9][0-9] 2>/dev/null | tr '\n' ' ')"
}

install_ort() {  # the parts -> onnxruntime-gpu in $SITE, once
  [[ -f $ROOT/ort.installed ]] && return 0
  if [[ ! -f $ROOT/parts/ort.sha256 ]]; then
    log "no ort.sha256 yet: carry .gpucheck/ort.sha256 with the last parts"
    return 1
  fi
  cat "$ROOT"/parts/ort.[0-9][0-9] >"$ROOT/ort.tar.xz"
  cp "$ROOT/parts/ort.sha256" "$ROOT/ort.sha256"
  if ! (cd "$ROOT" && sha256sum -c --quiet ort.sha256); then
    log "the assembled archive fails its checksum: a part is missing ($(ls "$ROOT"/parts))"
    return 1
  fi
  mkdir -p "$SITE" && tar -C "$SITE" -xJf "$ROOT/ort.tar.xz" && rm -f "$ROOT/ort.tar.xz"
  touch "$ROOT/ort.installed"
  log "onnxruntime archive installed into $SITE"
}

install_project() {  # the repo into $SITE: pip, or (no build backend there) its packages copied
  if [[ ${GPU_CHECK_INSTALL:-pip} == pip ]] &&
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$REPO"; then
    return 0
  fi
  # The device's python may lack setuptools >= 69 / wheel, and nothing can be downloaded there.
  # The install is only packages (pyproject's packages and package-dir) and a dist-info that
  # importlib.metadata reads: lay them out by hand. GPU_CHECK_INSTALL=copy forces this path.
  python3 - "$REPO" "$SITE" <<'PY'
import shutil, sys, tomllib
from pathlib import Path

repo, site = Path(sys.argv[1]), Path(sys.argv[2])
meta = tomllib.loads((repo / "pyproject.toml").read_text("utf-8"))
dirs = meta["tool"]["setuptools"].get("package-dir", {})
for pkg in meta["tool"]["setuptools"]["packages"]:
    parent = max((k for k in dirs if pkg == k or pkg.startswith(k + ".")), key=len, default=None)
    rel = dirs[parent] + pkg[len(parent):].replace(".", "/") if parent else pkg.replace(".", "/")
    dst = site / pkg.replace(".", "/")
    shutil.copytree(repo / rel, dst, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
project = meta["project"]
info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
PY
  log "project installed by copying its packages (no pip build)"
}

start() {
  collect
  if [[ ! -f $ROOT/site.installed ]]; then
    mkdir -p "$SITE"
    if compgen -G "$CARRY/py/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$CARRY"/py/*.whl
    fi
    install_project
    touch "$ROOT/site.installed"
    log "project and wheels installed into $SITE"
  fi
  env_setup
  if [[ -f $ROOT/export.done ]] || { [[ -f $ROOT/export.pid ]] && kill -0 "$(cat "$ROOT/export.pid")" 2>/dev/null; }; then
    log "export already done or running"
    return 0
  fi
  # the bench's own cache step (build from configs + iap-rt export), in the background
  nohup setsid python3 -c "
from iap_rt.bench.config import BenchConfig
from iap_rt.bench.sources import prepare_sources
prepare_sources(BenchConfig($EXPORT_CFG, cache_dir='$CACHE'))
open('$ROOT/export.done', 'w').write('ok\n')
" >"$RESULTS/export.log" 2>&1 &
  echo $! >"$ROOT/export.pid"
  log "export started in the background (pid $(cat "$ROOT/export.pid"), log $RESULTS/export.log)"
}

wait_export() {
  local limit=${1:-600} t=0
  while [[ ! -f $ROOT/export.done ]]; do
    if ! kill -0 "$(cat "$ROOT/export.pid" 2>/dev/null || echo 0)" 2>/dev/null; then
      log "the export is not running and not done: $(tail -n 3 "$RESULTS/export.log" 2>/dev/null)"
      return 1
    fi
    ((t >= limit)) && { log "export still running after ${limit} s"; return 1; }
    sleep 5
    t=$((t + 5))
  done
}

# ---- there: the measurements --------------------------------------------------------------------
elapsed() { echo $(($(date +%s) - $(cat "$ROOT/check.start"))); }

publish() {  # a stage's result into $OUT (what comes back) and $RESULTS (what stays)
  cp "$RESULTS/$1" "$OUT/$1" 2>/dev/null || true
  cp "$RESULTS/check.log" "$OUT/check.log" 2>/dev/null || true
}

bench() {  # NAME TIMEOUT [iap-rt bench options]: the JSON is written after every backend
  local name=$1 timeout=$2
  shift 2
  if [[ -f $RESULTS/$name.json ]] && python3 -c "import json,sys; sys.exit(not json.load(open('$RESULTS/$name.json')).get('complete'))"; then
    log "$name: already measured"
    return 0
  fi
  log "$name: iap-rt bench $*"
  python3 -m iap_rt.cli bench "${ARCH[@]}" --cache-dir "$CACHE" --timeout "$timeout" "$@" \
    --out "$RESULTS/$name.json" >>"$RESULTS/check.log" 2>&1 || log "$name: bench exited $? (see the JSON's skipped)"
  publish "$name.json"
}

stage1() {  # does the CUDA provider start; its cold start on the embedded model
  [[ -f $RESULTS/stage1.json ]] && { log "stage1: already measured"; return 0; }
  local device=cuda
  ((DRY)) && device=cpu
  python3 - "$RESULTS/stage1.json" "$device" <<'EOF' >>"$RESULTS/check.log" 2>&1 || log "stage1 failed"
import json, sys, time
t0 = time.perf_counter()
import onnxruntime as ort
from iap_rt.ortinfo import ort_status
from iap_rt.backends.ort import OrtBackend
from iap_rt.fileio import write_json_atomic
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.pipeline import Pipeline
import_s = time.perf_counter() - t0
out, device = sys.argv[1], sys.argv[2]
status = ort_status(try_cuda=device == "cuda")
doc = {"onnxruntime": status.flavour, "providers": list(status.providers),
       "cuda_problem": status.cuda_problem, "cuda_fix": status.cuda_fix, "import_s": import_s}
try:
    t1 = time.perf_counter()
    pipe = Pipeline(ModelDir.open(default_model_dir()), OrtBackend(device), progress=False)
    pipe.runners
    doc["load_s"] = time.perf_counter() - t1
    pipe("左边有一个红色的圆", steps=4, seed=0)
    doc["cold_start_s"] = time.perf_counter() - t1
    doc["device"] = device
except Exception as e:
    doc["error"] = f"{type(e).__name__}: {e}"
write_json_atomic(out, doc)
print(json.dumps(doc, indent=1))
EOF
  publish stage1.json
}

check() {
  install_ort || { ((DRY)) || return 1; }
  env_setup
  [[ -f $ROOT/check.start ]] || date +%s >"$ROOT/check.start"
  stage1
  wait_export "$((CHECK_BUDGET_S - $(elapsed)))" || return 1
  bench stage2 "torch=300,ort=240" --backends torch,ort
  bench stage3 240 --backends ort-graph
  local left=$((CHECK_BUDGET_S - $(elapsed)))
  if ((left < STAGE4_S)); then
    log "stage4 skipped: ${left} s left of ${CHECK_BUDGET_S}"
    return 0
  fi
  bench stage4_exported_unet 120 --backends ort --ort-unet exported
  bench stage4_compile "$T_COMPILE" --backends torch-compile
}

dry_run() {  # every stage here: a stand-in archive in 3 parts, carried over 3 "calls"
  local carry=$ROOT/carry stand=$ROOT/stand
  mkdir -p "$carry" "$stand/ort_stand_in-0.dist-info" "$ROOT/out"
  head -c 3000000 /dev/urandom >"$stand/ort_stand_in-0.dist-info/payload"
  tar -C "$stand" -cf - . | xz -0 >"$ROOT/stand.tar.xz"
  CARRY=$carry split_parts "$ROOT/stand.tar.xz" 1200000 800000
  local calls=("ort.00" "ort.01" "ort.02 ort.sha256")
  for i in 0 1 2; do  # each call carries only its parts
    local c=$ROOT/call$i
    mkdir -p "$c"
    for f in ${calls[$i]}; do cp "$carry/$f" "$c/" && [[ $f == *.sha256 ]] || cp "$carry/$f.sha256" "$c/"; done
    local stage=collect
    ((i == 0)) && stage=start
    ((i == 2)) && stage="collect check"
    # shellcheck disable=SC2086
    GPU_CHECK_CARRY=$c bash "$REPO/bench/gpu_check.sh" --dry-run --stage $stage
  done
  GPU_CHECK_CARRY=$ROOT/call2 bash "$REPO/bench/gpu_check.sh" --dry-run --stage check  # retry
  echo "dry run: results in $ROOT/out"
  ls "$ROOT/out"
}

if ((DRY)) && [[ ${1:-} != --stage ]]; then
  dry_run
  exit 0
fi
[[ ${1:-} == --stage ]] && shift
[[ $# -gt 0 ]] || { echo "usage: gpu_check.sh [--dry-run] prepare | start | collect [check] | check" >&2; exit 2; }
for stage in "$@"; do
  case "$stage" in
  prepare) prepare ;;
  resplit) resplit ;;
  start) start ;;
  collect) collect ;;
  check) check ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
