#!/usr/bin/env bash
# The runs behind benchmarks/history/README.md (SmolLM2-135M fp32, one torch thread, a shared 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD"
W=runs/history-workloads
python benchmarks/make_history_workloads.py --out $W --n 32
M=greedy,context+history@16,retrospec+history@16,arctic@16
bench() { nice -n 19 python -m retrospec bench --model smollm2-135m --dtype float32 --threads 1 --warmup 1 "$@"; }
[ "${1:-}" = "--skip-extract" ] || \
bench --data $W/extract.jsonl --per-category 1000 --limit 20 --max-new-tokens 96 --methods $M --out runs/hist-extract
bench --data $W/code.jsonl --per-category 1000 --limit 10 --max-new-tokens 128 --methods $M --out runs/hist-code
bench --data $W/agent.jsonl --per-category 1000 --limit 8 --max-new-tokens 64 --methods $M --out runs/hist-agent
bench --data ../shared/bench/specbench/question.jsonl --per-category 3 --max-new-tokens 128 \
  --methods greedy,retrospec-history@16,retrospec+history@16,arctic@16 --out runs/hist-specbench
# model-free replays of the greedy outputs each run saved: every source alone and together, the peer
for run in extract code agent specbench; do
  python -m retrospec simulate runs/hist-$run/outputs.jsonl --budget 16 \
    --methods context,history,context+history,arctic,arctic-local > runs/hist-$run/simulate.txt
done
