#!/usr/bin/env bash
# One GPU window of the campaign (reference_experiments/campaign.py), as one command:
#
#   bash reference_experiments/gpu/campaign.sh            # on the lent GPU machine
#   DRY_RUN=1 bash reference_experiments/gpu/campaign.sh  # the preflight's CPU parts, no training
#
# The machine has python3 with torch (CUDA), safetensors, tqdm, matplotlib, scikit-learn
# but no keras: the keras, namex and optree wheels for Python 3.12 travel in .gpu_wheels/
# and are installed with --no-index --target into a temporary folder on PYTHONPATH (never
# into the image's environment). `python3 -m reference_experiments.carry prepare --plan cifar`
# fills the carried folders (.gpu_wheels/, .gpu_data/, .gpu_teachers/, .gpu_rows/) and
# prints the `carry` list. What comes back under $OUT (at most 8 files): log, rows.jsonl,
# failures.jsonl and the teachers trained in this window (<key>/<files>).
#
# Environment: OUT (default ./gpu_out), MINUTES (8), PLAN (paper, cifar, cars, or a TOML of
# [[steps]]), PRECISION (fp32, as the official code), DEVICE (cuda; auto under DRY_RUN),
# DRY_RUN.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-gpu_out}"
if [[ -n "${DRY_RUN:-}" ]]; then DEVICE="${DEVICE:-auto}"; else DEVICE="${DEVICE:-cuda}"; fi
mkdir -p "$OUT"
TMP_SITE="$(mktemp -d)/site"
if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$TMP_SITE" .gpu_wheels/*.whl
fi
export PYTHONPATH="$PWD/src:$PWD/adapters:$PWD:$TMP_SITE${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=torch PYTHONUNBUFFERED=1
args=(--minutes "${MINUTES:-8}" --out "$OUT" --plan "${PLAN:-paper}"
      --precision "${PRECISION:-fp32}" --device "$DEVICE" --work .gpu_work)
if [[ -d .gpu_data ]]; then
    args+=(--data-dir .gpu_data)
fi
if [[ -d .gpu_teachers ]]; then
    args+=(--teachers-in .gpu_teachers)
fi
for rows in .gpu_rows/*.jsonl; do
    [[ -e "$rows" ]] && args+=(--rows-in "$rows")
done
if [[ -n "${DRY_RUN:-}" ]]; then
    args+=(--dry-run)
fi
python3 -m reference_experiments.campaign "${args[@]}" 2>&1 | tee -a "$OUT/log"
