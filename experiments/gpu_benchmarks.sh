#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md ("GPU step time and MFU"), as one call on a GPU machine.
#
# Each model's variants change one setting at a time against `base` (attention `xla`, GroupNorm
# `flax`, threefry, float32 residual stream), then all together; the first variant of each model
# is profiled (top ops, categories, the device's busy share). Variants of one model compile in
# parallel, then run one at a time: blocked (a wait per step) and pipelined (one wait at the end).
#
# Usage, from the repository root:  bash experiments/gpu_benchmarks.sh [LOG] [MODELS]
#   LOG defaults to gpu_benchmarks.log; MODELS to "dit_b2 ddpm_cifar10 adm_imagenet64" (cheapest
#   compile first, so that a time limit cuts the most expensive one). JDIFF_BENCH_ARGS is added
#   to every benchmark_mfu call (a CPU rehearsal: "--batch=1 --steps=1 --warmup=1 --peak_tflops=1").
#
# GPU images without grain (jdiff.training imports it): carry its wheels and install them first,
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# with .whl/ holding grain 0.2.18, array-record 0.8.6 and portpicker for the image's Python
# (3.12), fetched where pip reaches the index and ignored by git:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl grain==0.2.18 array-record==0.8.6 portpicker
set -euo pipefail
log=${1:-gpu_benchmarks.log}
models=${2:-dit_b2 ddpm_cifar10 adm_imagenet64}
export PYTHONUNBUFFERED=1
# FLOPs per step at each model's default batch, counted on the CPU (`--count_only`).
flops=ddpm_cifar10=4.507792e12,dit_b2=3.568827e13,adm_imagenet64=2.032858e13
declare -A variants=(
  [dit_b2]="base|attn=cudnn|prng=rbg|res=bfloat16|attn=cudnn,prng=rbg,res=bfloat16"
  [ddpm_cifar10]="base|attn=cudnn|norm=colsum|prng=rbg|attn=cudnn,norm=colsum,prng=rbg|attn=cudnn,norm=colsum,prng=rbg,batch=512,mu=bfloat16"
  [adm_imagenet64]="base|attn=cudnn,norm=colsum,prng=rbg"
)
declare -A extra=([adm_imagenet64]="--steps=10 --warmup=2")

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv \
    || echo "no nvidia-smi"
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$log"
start=$(date +%s)
for model in $models; do
  # shellcheck disable=SC2086  # extra holds several flags
  python3 -m experiments.benchmark_mfu --models="$model" --flops="$flops" \
    --profile_dir=/tmp/jdiff_gpu_profile --compile_threads=6 \
    --variants="${variants[$model]}" ${extra[$model]:-} ${JDIFF_BENCH_ARGS:-} 2>&1 | tee -a "$log"
  echo "$model done at T+$(($(date +%s) - start)) s" | tee -a "$log"
done
