#!/usr/bin/env bash
# The Beauty reproduction on a lent GPU machine, as one prepared command (README: Reproducing).
#
# Here, once (needs PyPI; builds the MiniLM embeddings and SIDs the rows read, on this CPU):
#   bash bench/gpu_reproduce.sh prepare
# There (the device image has torch, Lightning, scikit-learn, scipy, transformers; no network),
# with `.whl` and `.gpucache` carried:
#   bash bench/gpu_reproduce.sh run MINUTES
# It writes $OUT/reproduction.jsonl (the committed rows plus the new ones) and $OUT/runs.tar.gz
# (each run's config, metrics, selection and training curve); commit the first as
# bench/results/reproduction.jsonl. Rehearse here: OUT=/tmp/out bash bench/gpu_reproduce.sh run 3 --smoke
#   bash bench/gpu_reproduce.sh steps   # step times and the re-fitted overhead model into $OUT
#   (bench/bench_gpu_steps.py; rehearse: OUT=/tmp/out bash bench/gpu_reproduce.sh steps --quick)
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=experiments/sweep_reproduce_beauty.yaml
WHEELS=(omegaconf==2.4.0 faiss-cpu==1.15.1)

device_env() {  # the carried wheels and caches, no network
  if ! python3 -c "import omegaconf, faiss" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} GRID_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
}

case "${1:-}" in
prepare)
  rm -rf .whl && mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  # the stages every row reads, computed here into a cache folder that travels
  for tokenizer in rkmeans rvq rqvae; do
    GRID_CACHE=.gpucache "${PYTHON:-.venv/bin/python}" -m grid tokenize data=beauty \
      "tokenizer=$tokenizer" --out "/tmp/gpu-$tokenizer"
  done
  du -sh .whl .gpucache
  ;;
run)
  minutes=${2:?minutes}; shift 2
  device_env
  cp bench/results/reproduction.jsonl "$OUT/reproduction.jsonl" 2>/dev/null || true
  python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"
  python3 -m grid reproduce "$SWEEP" --minutes "$minutes" --results "$OUT/reproduction.jsonl" \
    --archive "$OUT/runs.tar.gz" --out /tmp/reproduce "$@" 2>&1 | tee "$OUT/reproduce.log"
  ;;
steps)  # step times eager / compiled / CUDA graphs and the overhead model re-fitted (~5 min)
  shift
  device_env
  python3 bench/bench_gpu_steps.py --out "$OUT" "$@" 2>&1 | tee "$OUT/steps.log"
  ;;
*)
  echo "usage: bash bench/gpu_reproduce.sh prepare | run MINUTES [KEY=VALUE ...] | steps" >&2
  exit 2
  ;;
esac
