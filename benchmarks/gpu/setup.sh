#!/usr/bin/env bash
# Runs on the GPU machine (no network): stages the carried GGUF pieces and the gguf wheel
# outside the repo, and once both pieces are there assembles, checks and converts the model.
# Call it at the start of every device command; it is idempotent.
set -euo pipefail
STAGE=/root/stage
MODEL=/root/models/smollm2-135m
mkdir -p "$STAGE"
for f in .device/piece_aa .device/piece_ab; do [ -f "$f" ] && cp "$f" "$STAGE/"; done
[ -d .device/whl ] && cp .device/whl/*.whl "$STAGE/" || true
# the ShareGPT suffix index (optional, its own call: ~49 MiB)
[ -f .device/idx/manifest.json ] && rm -rf /root/idx && cp -r .device/idx /root/idx || true
if [ ! -d /tmp/site ] && ls "$STAGE"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGE"/*.whl
fi
if [ -f "$STAGE/piece_aa" ] && [ -f "$STAGE/piece_ab" ] && [ ! -f "$MODEL/config.json" ]; then
  cat "$STAGE/piece_aa" "$STAGE/piece_ab" > "$STAGE/smollm2-135m.gguf"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $STAGE/smollm2-135m.gguf" | sha256sum -c -
  PYTHONPATH=/tmp/site:. python3 -c "from pathlib import Path; from retrospec.models import convert; convert(Path('$STAGE/smollm2-135m.gguf'), Path('$MODEL'))" 2>&1 | grep -v -E "it/s" | tail -2
fi
ls "$STAGE" "$MODEL" /root/idx 2>/dev/null | head -30
