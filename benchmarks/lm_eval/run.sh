#!/usr/bin/env bash
# lm-eval's hf model on gsm8k_local at batch size 1, plain and through the custom_generate
# folder (--gen_kwargs), back to back; then compare.py checks outputs and scores.
#   bash benchmarks/lm_eval/run.sh [LIMIT] [OUT]      (from the repository root)
set -euo pipefail
LIMIT=${1:-25}
OUT=${2:-runs/lm_eval}
MODEL=${MODEL:-$HOME/.cache/retrospec/models/smollm2-135m}   # retrospec models fetch smollm2-135m
export OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
common=(--model hf --model_args "pretrained=$MODEL,dtype=float32" --tasks gsm8k_local
        --include_path benchmarks/lm_eval --batch_size 1 --limit "$LIMIT" --device cpu --log_samples)
for mode in plain retrospec; do
    extra=()
    [ "$mode" = retrospec ] && extra=(--gen_kwargs custom_generate=integrations/hub,trust_remote_code=True)
    start=$(date +%s.%N)
    lm_eval "${common[@]}" "${extra[@]}" --output_path "$OUT/$mode" > "$OUT.$mode.log" 2>&1
    echo "$mode: $(echo "$(date +%s.%N) - $start" | bc) s wall" | tee -a "$OUT.times"
done
python benchmarks/lm_eval/compare.py "$OUT/plain" "$OUT/retrospec"
