#!/usr/bin/env bash
# One GPU window of the campaign (reference_experiments/campaign.py), as one command:
#
#   bash reference_experiments/gpu/campaign.sh            # on the lent GPU machine
#   DRY_RUN=1 bash reference_experiments/gpu/campaign.sh  # validate the plan, train nothing
#
# The machine has torch (CUDA), safetensors, tqdm, matplotlib, scikit-learn but no keras:
# the keras, namex and optree wheels for its Python travel in .gpu_wheels/ (download here
# with `pip download --only-binary=:all: --python-version 3.12 --no-deps -d .gpu_wheels
# keras namex optree`), the data in .gpu_data/ (a copy of ../shared/data/cifar10-jpeg, and
# stanford-cars-train64 when Fig. 3 is due); both folders are listed in .git/info/exclude
# and named in the run's `carry`. Results, teachers and the log go to $OUT (default
# ./gpu_out): commit them under reference_experiments/results/ and teachers/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-gpu_out}"
MINUTES="${MINUTES:-8}"
mkdir -p "$OUT"
if [[ -d .gpu_wheels ]]; then
    python -m pip install -q --no-index --find-links .gpu_wheels keras namex optree
fi
export PYTHONPATH="$PWD/src:$PWD/adapters:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=torch PYTHONUNBUFFERED=1
args=(campaign --minutes "$MINUTES" --out "$OUT/campaign" --data-dir .gpu_data)
if [[ -n "${DRY_RUN:-}" ]]; then
    args+=(--dry-run)
fi
python -m reference_experiments "${args[@]}" 2>&1 | tee "$OUT/log"
