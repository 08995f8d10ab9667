#!/usr/bin/env bash
# The one device check of the GPU path (issues 15, 32), for a session lent the GPU machine: one
# H100 or H200, Python 3.12 at /opt/torch/.venv with torch 2.11 + CUDA 13 (nvidia-* wheels),
# onnx, transformers and the CPU onnxruntime; no diffusers, no TensorRT, no network. Files reach
# it only with a `run` call (64 MiB a call, the working tree included), the session has 15
# minutes of device time in all (the machine's start counted), and the machine is HANDED BACK
# 30 s AFTER A CALL ENDS: a later call then gets a fresh, bare machine. So the calls below go
# back to back, prepared beforehand, and every call first checks that the state of the calls
# before it is there, stopping with one loud line ("GPU CHECK STOPPED: ...", exit 3) if not.
#
# Here, right before, in the checkout the session was started in (the device tool sends that
# one; .gpucheck/ is git-ignored and travels only as carried), ~3 minutes, needs the registry:
#   bash bench/gpu_check.sh prepare
#     -> .gpucheck/call1, .gpucheck/call2 (.gpucheck/call3 only if the tree grows), and
#        .gpucheck/PLAN.txt with the exact calls. Carried: diffusers + onnx-graphsurgeon wheels
#        (cp312) and onnxruntime-gpu 1.31.1 slimmed to what an sm_90 GPU loads (no TensorRT
#        provider, no C API library, the CUDA provider's fatbin cut to sm_90a: 58 MiB as tar.xz,
#        was 194 MiB), split so that each call fills its 64 MiB beside the working tree.
# There, with the current tree (24 MiB) the plan is two calls (PLAN.txt says if it became three):
#   run(command="bash bench/gpu_check.sh call 1", carry=[".gpucheck/call1"], timeout_s=120)
#       installs the wheels and the project (copied, non-editable) into /tmp/iap/site, keeps
#       part 1, starts building + exporting the SD 1.5 fp16 bench model in the background
#   run(command="bash bench/gpu_check.sh call 2", carry=[".gpucheck/call2"], timeout_s=600)
#       keeps part 2, unpacks onnxruntime-gpu, then measures until one deadline, 555 s after
#       it starts (GPU_CHECK_DEADLINE_S), each stage's time limit cut from it, writing
#       $OUT/gpu_*.json after each stage:
#         gpu_toy.json          ORT's CUDA provider starts? cold start; latents vs the CPU provider
#         gpu_sd15.json         torch fp16 eager, ort (CUDA, IO binding, fused UNet), ort-graph
#                               (CUDA graphs) at 512x512, 30 and 50 steps: UNet step (median,
#                               spread), e2e, cold start, peak GPU memory, latents/pixels vs torch
#         gpu_evidence.json     one UNet call torch fp32/fp16 vs ORT fp16 (tolerances), the fused
#                               attention nodes ORT's profiler saw on the CUDA provider, every
#                               backend's final latents and images vs torch's
#         gpu_sd15_compile.json torch.compile, only if its 180 s still fit before the deadline
#       + gpu_check.log, gpu_export.log
#   give_back()        at once: nothing more is needed from the machine
#   then commit the gpu_*.json under bench/results/ (the logs are git-ignored there).
# A stage is final when nothing in it failed; `call 2` again (carry [] is enough) reruns only
# the stages that are not, if the device budget left (status) covers them.
#
#   bash bench/gpu_check.sh --dry-run    rehearses all of it here on the CPU with the device's
#       install path: a Python that sees no editable install, the project copied into a site,
#       a stand-in archive carried in two parts over two "calls", the tiny model, a fresh
#       "machine" that must stop call 2, and a retry (tests/integration/test_gpu_check_dry_run.py)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY=0
if [[ ${1:-} == --dry-run ]]; then
  DRY=1
  shift
fi
ROOT=${GPU_CHECK_ROOT:-/tmp/iap}
CARRY=${GPU_CHECK_CARRY:-$REPO/.gpucheck}
PY=${GPU_CHECK_PYTHON:-python3}
SITE=$ROOT/site ORTDIR=$ROOT/ort PARTS=$ROOT/parts STATE=$ROOT/state WORK=$ROOT/work
CACHE=${GPU_CHECK_CACHE:-$ROOT/cache} RESULTS=$ROOT/results KEEP=$ROOT/outputs
OUT=${OUT:-$ROOT/out}
ORT_VERSION=1.31.1 SM=90
PY_WHEELS="diffusers==0.42.1 onnx-graphsurgeon==0.6.1"  # beyond the device's torch/onnx/...
CALL_MIB=64 MARGIN_KIB=1024 MAX_CALLS=3
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-555} RESERVE_S=20  # the last call's; the run's limit is 600
if ((DRY)); then  # the tiny model on the CPU: every stage in seconds
  ARCH=tiny PREC=fp32 DEVICE=cpu
  BENCH=(--arch tiny --device cpu --steps 2 --also-steps 3 --repeat 1 --threads 1)
  NEED_TOY=10 NEED_SD=20 NEED_EVIDENCE=10 NEED_COMPILE=10
  COMPILE_CAP=${GPU_CHECK_COMPILE_CAP:-5}  # torch.compile on a CPU takes minutes: its timeout
else
  ARCH=sd15 PREC=fp16 DEVICE=cuda
  BENCH=(--arch sd15 --fp16 --device cuda --height 512 --width 512 --steps 30 --also-steps 50
    --repeat 3)
  # what each stage needs to finish there (estimates: the SD 1.5 sessions' creation and
  # torch.compile's first call dominate; 30 + 50-step images take seconds on an H100)
  NEED_TOY=60 NEED_SD=200 NEED_EVIDENCE=60 NEED_COMPILE=180 COMPILE_CAP=
fi

log() { mkdir -p "$RESULTS" && echo "[gpu_check $(date +%T)] $*" | tee -a "$RESULTS/gpu_check.log" >&2; }
stop() {  # the one loud line (stderr: also from inside $(...)), then exit 3
  mkdir -p "$RESULTS" "$OUT"
  echo "GPU CHECK STOPPED: $*" | tee -a "$RESULTS/gpu_check.log" >&2
  cp "$RESULTS/gpu_check.log" "$OUT/" 2>/dev/null || true
  exit 3
}
py() { (cd "$WORK" && "$PY" "$@"); }  # never from the checkout: it would shadow the install

env_setup() {  # $1: the PYTHONPATH (the install, + the carried onnxruntime-gpu for measuring)
  export PYTHONPATH=$1 PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  ((DRY)) && return 0
  local libs  # CUDA/cuDNN of torch's nvidia-* wheels, for onnxruntime-gpu without torch
  libs=$(py -c 'import glob, os, nvidia
print(":".join(sorted(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib")))))' \
    2>/dev/null || true)
  export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

# ---- here ---------------------------------------------------------------------------------------
tree_bytes() { git ls-files -co --exclude-standard -z | xargs -0 du -cb | tail -n 1 | cut -f1; }

prepare() {
  local prep=$ROOT/prep
  mkdir -p "$prep/py" "$CARRY"
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$prep/py" $PY_WHEELS
  if [[ ! -f $prep/ort.tar.xz ]]; then
    python3 -m pip download -q --no-deps "${plat[@]}" -d "$prep" "onnxruntime-gpu==$ORT_VERSION"
    python3 bench/gpu_carry.py slim "$prep"/onnxruntime_gpu-"$ORT_VERSION"-*.whl "$prep/ort" \
      --arch "$SM" >"$prep/slim.json"
    log "slimmed: $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['removed'], d['cuda_provider'])" "$prep/slim.json")"
    python3 bench/gpu_carry.py pack "$prep/ort" "$prep/ort.tar.xz" >/dev/null
  fi
  plan "$prep/ort.tar.xz" "$prep"/py/*.whl
}

plan() {  # ARCHIVE WHEEL...: the calls that carry them beside the working tree (resplit)
  local archive=$1
  shift
  local tree py cap caps=() need n
  tree=$(tree_bytes)
  py=$(du -cb "$@" | tail -n 1 | cut -f1)
  cap=$((CALL_MIB * 1048576 - tree - MARGIN_KIB * 1024))
  need=$(($(stat -c %s "$archive") + py))
  n=$(((need + cap - 1) / cap))
  ((n <= MAX_CALLS)) || stop "the carry ($((need >> 20)) MiB) needs $n calls beside a $((tree >> 20)) MiB tree (at most $MAX_CALLS): shrink the tree"
  local even=$(((need + n - 1) / n))  # the same load on every call: room for the tree to grow
  for ((i = 1; i <= n; i++)); do caps+=($((i == 1 ? even - py : even))); done
  rm -rf "$CARRY"/call*
  python3 bench/gpu_carry.py split "$archive" "$CARRY" "$(IFS=,; echo "${caps[*]}")" >/dev/null
  mkdir -p "$CARRY/call1/py" && cp "$@" "$CARRY/call1/py/"
  {
    echo "# $(date -u +%FT%TZ): tree $((tree >> 20)) MiB, carry $((need >> 20)) MiB ($(($(stat -c %s "$archive") >> 20)) MiB onnxruntime-gpu archive + $((py >> 10)) KiB wheels), $n calls, $(((cap - even) >> 20)) MiB to spare in each"
    for ((i = 1; i <= n; i++)); do
      local t=120
      ((i == n)) && t=600
      echo "run(command=\"bash bench/gpu_check.sh call $i\", carry=[\".gpucheck/call$i\"], timeout_s=$t)   # $(du -sm "$CARRY/call$i" | cut -f1) MiB + tree"
    done
    echo "give_back()"
  } | tee "$CARRY/PLAN.txt"
}

# ---- there ----------------------------------------------------------------------------------------
calls_total() {  # how many calls the carried manifest says
  local m=$CARRY/call$1/MANIFEST.json
  [[ -f $m ]] || m=$PARTS/MANIFEST.json
  [[ -f $m ]] || stop "call $1 carries no MANIFEST.json and none was collected before: carry .gpucheck/call$1"
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['calls'])" "$m"
}

require_state() {  # N: every call before N left its state on this machine
  local i
  for ((i = 1; i < $1; i++)); do
    [[ -f $STATE/call$i ]] && continue
    stop "call $1 found no state of call $i on this machine ($STATE/call$i missing): this is a fresh machine (the last one went back 30 s after its call ended). Nothing ran. Start again at call 1 only if status's budget_left_s covers the whole plan (about 13 minutes)."
  done
  local boot
  boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo ?)
  if [[ -f $STATE/call1 ]] && ! grep -q "boot $boot" "$STATE/call1"; then
    stop "call $1 runs on another boot than call 1 ($(cat "$STATE/call1")): the machine was replaced. Start again at call 1."
  fi
}

install_site() {  # the carried wheels + the project, copied as pyproject lays it out
  [[ -f $STATE/site ]] && return 0
  rm -rf "$SITE" && mkdir -p "$SITE"
  if compgen -G "$CARRY/call1/py/*.whl" >/dev/null; then
    (cd "$WORK" && "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
      "$CARRY"/call1/py/*.whl)
  fi
  python3 "$REPO/bench/gpu_carry.py" install "$REPO" "$SITE" >/dev/null
  touch "$STATE/site"
  log "project (copied, non-editable) and wheels installed into $SITE"
}

start_export() {
  if [[ -f $STATE/export.pid ]] && kill -0 "$(cat "$STATE/export.pid")" 2>/dev/null; then
    log "export: running (pid $(cat "$STATE/export.pid"))"
    return 0
  fi
  if grep -q '"status": "done"' "$STATE/export.json" 2>/dev/null; then
    log "export: done"
    return 0
  fi
  env_setup "$SITE"  # the device's own CPU onnxruntime validates the export
  # setsid: it outlives this call (the next call waits for it)
  (cd "$WORK" && exec setsid nohup "$PY" "$REPO/bench/gpu_check.py" export "$CACHE" "$ARCH" "$PREC" \
    "$STATE/export.json" >"$RESULTS/gpu_export.log" 2>&1 </dev/null) &
  echo $! >"$STATE/export.pid"
  log "export: started in the background (pid $!, log gpu_export.log)"
}

export_state() {  # done | failed | running | dead
  if grep -q '"status": "done"' "$STATE/export.json" 2>/dev/null; then echo done
  elif grep -q '"status": "failed"' "$STATE/export.json" 2>/dev/null; then echo failed
  elif kill -0 "$(cat "$STATE/export.pid" 2>/dev/null || echo 0)" 2>/dev/null; then echo running
  else echo dead; fi
}

call() {
  local n=$1 total
  mkdir -p "$ROOT" "$RESULTS" "$OUT" "$WORK" "$STATE" "$KEEP"
  require_state "$n"
  total=$(calls_total "$n")
  log "call $n of $total (root $ROOT, python $PY)"
  if [[ -d $CARRY/call$n ]]; then
    local have
    have=$(python3 "$REPO/bench/gpu_carry.py" collect "$CARRY/call$n" "$PARTS" 2>&1) ||
      stop "call $n: $have"
    log "parts on this machine: $have"
  fi
  if ((n == 1)); then
    install_site
    echo "boot $(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo ?) at $(date -u +%FT%TZ)" >"$STATE/call1"
    start_export
  else
    log "export: $(export_state)"
    touch "$STATE/call$n"
  fi
  publish
  if ((n == total)); then measure; fi
}

# ---- there: the measurements --------------------------------------------------------------------
left() { echo $((DEADLINE - $(date +%s))); }

publish() {  # what has been measured into $OUT (what comes back), after every stage
  cp "$RESULTS"/gpu_*.json "$RESULTS"/gpu_*.log "$OUT/" 2>/dev/null || true
}

stage_final() {  # NAME: 0 when $RESULTS/NAME.json is final (logs why not)
  local why
  if why=$(py "$REPO/bench/gpu_check.py" done "$RESULTS/$1.json"); then
    log "$1: final, kept"
    return 0
  fi
  [[ -f $RESULTS/$1.json ]] && log "$1: again ($why)"
  return 1
}

has_time() {  # NAME NEED: whether NEED seconds are left before the deadline's reserve
  local l
  l=$(($(left) - RESERVE_S))
  ((l >= $2)) && return 0
  log "$1: skipped: needs $2 s, $l s left before the deadline"
  return 1
}

bench() {  # NAME BACKENDS NEED [CAP]: one iap-rt bench, cut to the deadline
  local name=$1 backends=$2 need=$3 cap=${4:-}
  stage_final "$name" && return 0
  has_time "$name" "$need" || return 0
  local until=$((DEADLINE - RESERVE_S)) limit=()
  [[ -n $cap ]] && limit=(--timeout "$cap")
  log "$name: iap-rt bench --backends $backends (until $(date -d @"$until" +%T))"
  (cd "$WORK" && timeout -k 10 $((until - $(date +%s) + 10)) "$PY" -m iap_rt.cli bench "${BENCH[@]}" \
    --backends "$backends" --cache-dir "$CACHE" --keep-outputs "$KEEP" --deadline "$until" \
    "${limit[@]}" --out "$RESULTS/$name.json") >>"$RESULTS/gpu_check.log" 2>&1 ||
    log "$name: bench exited $? (the JSON's skipped says why)"
  publish
}

wait_export() {  # until the export is done, or too little time is left for what needs it
  local state
  while state=$(export_state) && [[ $state == running ]] && (($(left) - RESERVE_S >= $1)); do
    sleep 5
  done
  state=$(export_state)
  [[ $state == done ]] && { log "export: done ($(py -c "import json; print(json.load(open('$STATE/export.json')).get('seconds'), 's')"))"; return 0; }
  publish
  log "export: $state; the last 80 lines of gpu_export.log (all of it is in \$OUT):"
  tail -n 80 "$RESULTS/gpu_export.log" >&2 || true
  echo "GPU CHECK: the $ARCH export is $state with $(left) s left: gpu_sd15* and gpu_evidence not measured (gpu_export.log has its whole output)"
  return 1
}

measure() {
  DEADLINE=$(($(date +%s) + DEADLINE_S))
  log "measuring until $(date -d @"$DEADLINE" +%T) (${DEADLINE_S} s)"
  if [[ ! -d $ORTDIR ]]; then
    local why
    why=$(python3 "$REPO/bench/gpu_carry.py" assemble "$PARTS" "$ORTDIR" 2>&1) || stop "onnxruntime-gpu: $why"
    log "onnxruntime-gpu unpacked into $ORTDIR"
  fi
  env_setup "$ORTDIR:$SITE"
  if ! stage_final gpu_toy && has_time gpu_toy "$NEED_TOY"; then
    log "gpu_toy: ORT $DEVICE vs CPU, embedded toy model (export: $(export_state))"
    local t=$((2 * NEED_TOY)) l=$(($(left) - RESERVE_S))
    ((t < l)) || t=$l
    (cd "$WORK" && timeout -k 5 "$t" "$PY" "$REPO/bench/gpu_check.py" toy "$RESULTS/gpu_toy.json" \
      "$DEVICE") >>"$RESULTS/gpu_check.log" 2>&1 || log "gpu_toy: exited $?"
    publish
  fi
  local exported=0
  if wait_export $((NEED_SD + NEED_EVIDENCE)); then
    exported=1
    bench gpu_sd15 torch,ort,ort-graph "$NEED_SD"
    if ! stage_final gpu_evidence && has_time gpu_evidence "$NEED_EVIDENCE"; then
      log "gpu_evidence: one UNet call torch vs ORT, ORT's profile, kept outputs vs torch"
      (cd "$WORK" && timeout -k 5 $(($(left) - RESERVE_S)) "$PY" "$REPO/bench/gpu_check.py" \
        evidence "$RESULTS/gpu_evidence.json" "$CACHE" "$ARCH" "$KEEP" "$DEVICE") \
        >>"$RESULTS/gpu_check.log" 2>&1 || log "gpu_evidence: exited $?"
      publish
    fi
    bench gpu_sd15_compile torch-compile "$NEED_COMPILE" "$COMPILE_CAP"
  fi
  py "$REPO/bench/gpu_check.py" summary "$RESULTS" | tee -a "$RESULTS/gpu_check.log"
  publish
  log "done with $(left) s left; results in $OUT: $(cd "$OUT" && echo *)"
  ((exported))
}

# ---- the rehearsal ------------------------------------------------------------------------------
dry_run() {
  local root
  root=$(mktemp -d /tmp/gpu_check_dry.XXXX)
  export GPU_CHECK_ROOT=$root/machine GPU_CHECK_CARRY=$root/carry OUT=$root/machine/out
  local py
  py=$(python3 bench/gpu_carry.py devpython "$root/python")
  if (cd / && "$py" -c 'import iap_rt' 2>/dev/null); then
    echo "dry run: $py imports iap_rt without an install: not the device's situation" >&2
    exit 1
  fi
  export GPU_CHECK_PYTHON=$py
  # the carry: a stand-in wheel (call 1's py/) and a stand-in archive in two parts
  local stand=$root/stand
  mkdir -p "$stand/archive/gpucheck_stand_in" "$stand/py"
  head -c 2000000 /dev/urandom >"$stand/archive/gpucheck_stand_in/payload"
  python3 - "$stand/py" <<'PY'
import sys, zipfile
with zipfile.ZipFile(f"{sys.argv[1]}/gpucheck_wheel-0-py3-none-any.whl", "w") as z:
    z.writestr("gpucheck_wheel/__init__.py", "")
    z.writestr("gpucheck_wheel-0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gpucheck-wheel\nVersion: 0\n")
    z.writestr("gpucheck_wheel-0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("gpucheck_wheel-0.dist-info/RECORD", "")
PY
  python3 bench/gpu_carry.py pack "$stand/archive" "$stand/ort.tar.xz" >/dev/null
  python3 bench/gpu_carry.py split "$stand/ort.tar.xz" "$GPU_CHECK_CARRY" 1200000,2000000 >/dev/null
  mkdir -p "$GPU_CHECK_CARRY/call1/py" && cp "$stand"/py/*.whl "$GPU_CHECK_CARRY/call1/py/"
  echo "dry run: call 2 on a fresh machine must stop" >&2
  local rc=0
  GPU_CHECK_ROOT=$root/fresh bash bench/gpu_check.sh --dry-run call 2 || rc=$?
  ((rc == 3)) || { echo "dry run: call 2 on a fresh machine exited $rc, not 3" >&2; exit 1; }
  bash bench/gpu_check.sh --dry-run call 1
  bash bench/gpu_check.sh --dry-run call 2
  echo "dry run: the retry" >&2
  bash bench/gpu_check.sh --dry-run call 2
  echo "dry run: results in $OUT"
  ls "$OUT"
}

case "${1:-}" in
prepare) prepare ;;
resplit) plan "$ROOT/prep/ort.tar.xz" "$ROOT"/prep/py/*.whl ;;
call)
  [[ ${2:-} =~ ^[1-3]$ ]] || { echo "usage: gpu_check.sh call N (N = 1..3)" >&2; exit 2; }
  call "$2"
  ;;
"")
  if ((DRY)); then dry_run; else
    echo "usage: gpu_check.sh prepare | resplit | call N | --dry-run" >&2
    exit 2
  fi
  ;;
*) echo "unknown command $1 (prepare | resplit | call N | --dry-run)" >&2; exit 2 ;;
esac
