#!/usr/bin/env bash
# The accelerator checks in one go: the main job (default preset, CE-LoRA and FedAvg-LoRA),
# the round benchmark at the CPU's size in float32 and at a larger size in bf16, and,
# with `many`, the many-clients benchmark; with `gpu`, the GPU-sized preset (issue 23, item 5:
# 64 clients, 32 x 256 tokens, bf16) with cuDNN attention against the compiled PyTorch peer,
# then with XLA's attention and with remat (MFU in each JSON's "mfu"). Each step has its own time limit, so one failure
# does not cost the others; every log goes to OUT/suite.log, JSON results to OUT/.
#
#   bash benchmarks/device_suite.sh OUT [main|speed|many|gpu ...]    # default: main speed
#
# PYTHON picks the interpreter (default python3); LIMIT caps each step in seconds (default
# 300). Seen on one H200 (2026-11-26, jax 0.11.2): main 113 s, speed_f32 131 s, speed_bf16
# 193 s; many needs about 70 s per N (a fresh process each: load, compile, rounds).
set -u
out=${1:?usage: device_suite.sh OUT [main speed many]}
shift
steps=${*:-main speed}
py=${PYTHON:-python3}
mkdir -p "$out"
log="$out/suite.log"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME COMMAND...: run with a time limit, log, report rc and seconds
  local name=$1 started rc
  shift
  started=$(date +%s)
  echo "== $name: $*" | tee -a "$log"
  timeout "${LIMIT:-300}" "$@" >>"$log" 2>&1
  rc=$?
  echo "== $name: rc=$rc after $(( $(date +%s) - started )) s" | tee -a "$log"
}

{ nvidia-smi -L; "$py" -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"; } >>"$log" 2>&1
tail -2 "$log"

for name in $steps; do
  case $name in
    main)
      step main "$py" -m celora_jax.cli.main run --methods celora,fedavg_lora --no-progress --output-dir "$out/runs"
      (cd "$out" && tar czf runs.tgz runs && rm -rf runs) ;;
    speed)
      step speed_f32 "$py" benchmarks/round_speed.py --skip-profile --out "$out/round_speed_f32.json"
      step speed_bf16 "$py" benchmarks/round_speed.py --skip-profile --set model.dtype=bfloat16 \
        --set partition.num_clients=32 --set model.max_length=128 --out "$out/round_speed_bf16.json" ;;
    many)
      step many "$py" benchmarks/many_clients.py --clients 1,8,32,128,1000 --unblocked-up-to 1000 --block 125 \
        --out "$out/many_clients.json" ;;
    gpu)
      step gpu_cudnn "$py" benchmarks/round_speed.py --preset gpu --skip-profile --out "$out/round_speed_gpu.json"
      step gpu_xla "$py" benchmarks/round_speed.py --preset gpu --skip-profile --skip-pytorch \
        --set model.attention=xla --out "$out/round_speed_gpu_xla.json"
      step gpu_remat "$py" benchmarks/round_speed.py --preset gpu --skip-profile --skip-pytorch \
        --set model.remat=true --out "$out/round_speed_gpu_remat.json" ;;
    *) echo "unknown step $name" | tee -a "$log"; exit 2 ;;
  esac
done
grep -E "^== .*rc=|s per round|fraction_of_peak|\"mfu\"|Error|error" "$log" | tail -40
