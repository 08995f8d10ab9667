#!/usr/bin/env bash
# The GPU measurements of issue 7, staged for the project's lent GPU machine (the `device`
# tool's `run`; see bench/README.md, "GPU runbook"). That machine has Python 3.12, PyTorch
# (CUDA 13), onnx, onnxscript, transformers and the CPU onnxruntime, no network, and keeps
# /tmp only while it stays warm (30 s after a call): run the stages back to back.
#
# Prepare here (once; .whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl onnxruntime-gpu==1.31.0
#   python3 -m pip download --no-deps -d .whl/py diffusers==0.42.1 onnx-graphsurgeon==0.6.1
#   (cd .whl && mkdir -p ortgpu && sha256sum onnxruntime_gpu-*.whl > ortgpu/SHA256 &&
#    split -b 38M -d onnxruntime_gpu-*.whl ortgpu/part- && rm onnxruntime_gpu-*.whl)
# (38 MB parts: one call carries at most 64 MiB, the ~23 MB working tree included.)
#
# Stages, one `run` each (carry in brackets):
#   bash bench/gpu_session.sh part 00   [.whl/ortgpu/part-00]  ... up to the last part
#   bash bench/gpu_session.sh install   [.whl/ortgpu/SHA256, .whl/py]
#   bash bench/gpu_session.sh build     builds + exports the SD 1.5 fp16 bench model
#   bash bench/gpu_session.sh bench NAME [iap-rt bench options]  -> $OUT/bench_sd15_NAME.json
#     e.g. bench h100_50steps --steps 50 --repeat 3
#          bench h100_50steps_exported_unet --steps 50 --repeat 3 --backends ort,ort-graph \
#                --ort-unet exported          (the A/B: unet.onnx instead of unet.ort.onnx)
# `install` also works without the onnxruntime-gpu parts (then `ort` reports why it cannot
# run on CUDA and the torch figures still come back).
set -euo pipefail

ROOT=/tmp/iap
SITE=$ROOT/site
CACHE=$ROOT/cache
mkdir -p "$ROOT"
cd "$(dirname "$0")/.."

env_setup() {
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  # the CUDA / cuDNN libraries of PyTorch's nvidia-* wheels, for onnxruntime-gpu's CUDA provider
  # in processes that do not import torch (the runtime's `ort` worker never does)
  local libs
  libs=$(python3 -c 'import glob, os, nvidia
print(":".join(sorted(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib")))))' \
    2>/dev/null || true)
  export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PYTHONUNBUFFERED=1
}

stage=${1:?usage: gpu_session.sh part NN | install | build | bench NAME [iap-rt bench options]}
case "$stage" in
part)
  n=${2:?which part (00, 01, ...)}
  cat ".whl/ortgpu/part-$n" >>"$ROOT/ortgpu.parts"
  echo "$n" >>"$ROOT/ortgpu.have"
  ls -l "$ROOT/ortgpu.parts"
  ;;
install)
  mkdir -p "$SITE"
  wheels=(.whl/py/*.whl)
  if [[ -f $ROOT/ortgpu.parts ]]; then
    name=$(awk '{print $2}' .whl/ortgpu/SHA256)
    mv "$ROOT/ortgpu.parts" "$ROOT/$name"
    (cd "$ROOT" && sha256sum -c "$OLDPWD/.whl/ortgpu/SHA256")
    wheels+=("$ROOT/$name")
  else
    echo "no onnxruntime-gpu parts on this machine: installing without it"
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}"
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" .
  env_setup
  python3 - <<'EOF'
import onnxruntime as ort, torch, diffusers, iap_rt
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("torch", torch.__version__, torch.cuda.get_device_name(0), "diffusers", diffusers.__version__)
EOF
  ;;
build)
  env_setup
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  time python3 -m iap_rt.benchmark build sd15 "$CACHE/sd15-seed0" fp16
  ;;
bench)
  env_setup
  name=${2:?a name for the result file, e.g. h100_50steps}
  shift 2
  out=${OUT:-$ROOT/out}
  mkdir -p "$out"
  # later options win: --backends, --steps, --repeat may be overridden after NAME
  set -o pipefail
  "$SITE/bin/iap-rt" bench --arch sd15 --device cuda --fp16 --steps 50 --repeat 3 \
    --backends torch,torch-compile,ort,ort-graph,trt --cache-dir "$CACHE" "$@" \
    --out "$out/bench_sd15_$name.json" 2>&1 | tee "$out/bench_sd15_$name.log"
  ;;
*)
  echo "unknown stage $stage" >&2
  exit 2
  ;;
esac
