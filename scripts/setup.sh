#!/usr/bin/env bash
# Sets up a fresh machine: .venv at the repo root with rewardlab and its test extras (CPU torch 2.13),
# plus .official-venv with the official image-reward / cyclereward packages for the parity tests.
#   bash scripts/setup.sh            # everything
#   SKIP_OFFICIAL=1 bash scripts/setup.sh   # rewardlab only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
# torch first, pinned to the local CPU build: later requirements ("torch>=2.4") are then already met.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
if [ -z "${SKIP_OFFICIAL:-}" ] && [ -f ../shared/tools/official-env.sh ]; then
  bash ../shared/tools/official-env.sh .official-venv >/dev/null
  # HPS v2 reference: the hpsv2 wheel's bundled open_clip. The wheel lacks its BPE vocabulary file,
  # which is the same file openai-clip ships.
  .official-venv/bin/pip install -q --no-deps hpsv2==1.2.0
  SP=$(.official-venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
  cp -n "$SP/clip/bpe_simple_vocab_16e6.txt.gz" "$SP/hpsv2/src/open_clip/" 2>/dev/null || true
fi
# Headless Chromium renders the evaluation report in one test (skipped when absent).
if [ -n "${CI:-}" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: chromium not installed; the report screenshot test will be skipped" >&2
fi
echo "rewardlab installed in .venv ($(.venv/bin/python -c 'import rewardlab; print(rewardlab.__version__)'))"
