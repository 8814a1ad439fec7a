#!/usr/bin/env bash
# The ShareGPT chat datastore, rendered the way each model sees conversations.
# usage: bash indexes/sharegpt.sh [OUT_ROOT]   (default: runs/idx)
set -euo pipefail
out=${1:-runs/idx}
corpus=../shared/bench/datastore/sharegpt_chat_corpus.jsonl.gz
retrospec index build --tokenizer smollm2-135m --chat-template --input "$corpus" --out "$out/sharegpt-smollm2"
retrospec index build --tokenizer qwen2.5-coder-1.5b --chat-template --input "$corpus" --out "$out/sharegpt-qwen25"
retrospec index verify "$out/sharegpt-smollm2"
retrospec index verify "$out/sharegpt-qwen25"
