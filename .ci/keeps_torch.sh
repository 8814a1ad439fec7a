#!/usr/bin/env bash
# pip install of the library and of each integration into an environment that already has
# another torch must keep that torch (the GPU machine's CUDA torch 2.11, say), never replace it.
#
# A fresh venv gets a metadata-only stand-in for torch 2.11.0 (a dist-info, no 900 MB wheel),
# then `pip install --dry-run --report` of the project resolves against it: the report lists
# what pip would install, and torch must not be in it. A pin (torch==2.13.0) or a floor above
# 2.11 in any of the project's pyproject files makes pip want a torch, and this check fail.
# Needs only the package index for the other packages' metadata; installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m venv "$work/env"
py="$work/env/bin/python"
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
dist="$site/torch-2.11.0.dist-info"
mkdir "$dist"
printf 'Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n' > "$dist/METADATA"
echo pip > "$dist/INSTALLER"
: > "$dist/RECORD"
"$py" -m pip install --disable-pip-version-check --quiet --dry-run --report "$work/report.json" \
    ".[all]" integrations/haystack integrations/langchain integrations/hub >/dev/null 2>"$work/pip.log" \
    || { cat "$work/pip.log" >&2; exit 1; }
python - "$work/report.json" <<'EOF'
import json
import sys

report = json.load(open(sys.argv[1]))
names = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
if "torch" in names:
    raise SystemExit(f"keeps_torch: FAILED: pip would replace the installed torch 2.11.0 with torch {names['torch']}")
wanted = ("retrospec", "retrospec-haystack", "retrospec-langchain", "retrospec-hub", "transformers")
missing = [n for n in wanted if n not in names]
if missing:
    raise SystemExit(f"keeps_torch: the dry run did not resolve {missing}; see the report")
print(f"keeps_torch: pip keeps the installed torch 2.11.0 while installing retrospec[all] and its integrations "
      f"({len(names)} packages, transformers {names['transformers']})")
EOF
