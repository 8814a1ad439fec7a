#!/usr/bin/env bash
# A code datastore: the Python standard library of this interpreter (no site-packages, no tests).
# usage: bash indexes/stdlib.sh [OUT_ROOT]   (default: runs/idx)
set -euo pipefail
out=${1:-runs/idx}
stdlib=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
retrospec index build --tokenizer qwen2.5-coder-1.5b --input "$stdlib" --glob '*.py' \
  --exclude 'site-packages/*' --exclude 'test/*' --exclude '*/tests/*' --exclude 'idlelib/*' --out "$out/python-stdlib-qwen25"
