#!/usr/bin/env bash
# The benchmark protocol's grid on a lent GPU machine (docs/benchmarks.md, "On a lent GPU"),
# for the settings the CPU grid is not running, so that the two never run the same run.
# The assets come first, in chunks, one call each (benchmarks/device_assets.py pack prints
# the carry lists); the call that carries the last chunk runs this script:
#
#   bash benchmarks/device_protocol.sh OUT SECONDS SETTINGS [protocol flags...]
#
# It unpacks the assets under /tmp/site, prints the versions it runs with, runs
# `python -m experiments.protocol --stage run` until SECONDS have passed (then SIGINT: the run
# in progress is lost, its checkpoints are not sent back), and writes to OUT the runs it
# finished (OUT/protocol_runs.tgz, paths from the repository root: `tar xzf` it in a
# checkout, then `--stage compact` and `--stage report` there) and its log.
# JAX_DEFAULT_MATMUL_PRECISION=highest keeps float32 products float32 (no TF32), as on the CPU.
set -u
out=${1:?usage: device_protocol.sh OUT SECONDS SETTINGS [protocol flags...]}
seconds=${2:?seconds}
settings=${3:?settings}
shift 3
py=${PYTHON:-python3}
log="$out/protocol.log"
mkdir -p "$out"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest
# Chunks that earlier calls carried stay in the repository's copy while the machine is warm;
# those calls also copied them to /root/.celora-assets, outside it (docs/benchmarks.md).
mkdir -p .device-assets && cp -n /root/.celora-assets/part* .device-assets/ 2>/dev/null
set -o pipefail
"$py" benchmarks/device_assets.py unpack .device-assets /tmp/site 2>&1 | tee -a "$log" || exit 1
set +o pipefail
"$py" -c "import jax, flax, optax, celora_jax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)" 2>&1 | tee -a "$log"
marker=$(mktemp)
timeout --signal=INT --kill-after=30 "$seconds" "$py" -m experiments.protocol --stage run --settings "$settings" "$@" \
  >>"$log" 2>&1
echo "== protocol: rc=$? after at most $seconds s" | tee -a "$log"
# Every run directory that finished here (its summary.json written after the marker), under
# the protocol's results root or the smoke one.
find experiments/results -name summary.json -newer "$marker" -path '*/seed*' -printf '%h\n' | sort >"$out/finished.txt"
if [ -s "$out/finished.txt" ]; then
  tar czf "$out/protocol_runs.tgz" --exclude=checkpoints -T "$out/finished.txt"
fi
echo "== $(wc -l <"$out/finished.txt") runs finished" | tee -a "$log"
grep -E "^protocol: |Error|error" "$log" | tail -30
