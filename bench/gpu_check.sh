#!/usr/bin/env bash
# The GPU measurements for docs/speed.md: the official 7B architecture with random bf16 weights on one GPU.
#
#   bench/gpu_check.sh targets   # 512x512 generate with CFG + understanding 256 tokens (about 5 minutes)
#   bench/gpu_check.sh rest      # generate without CFG + edit (about 5 minutes)
#
# Each part runs ours (plain and compiled: torch.compile + CUDA graphs) and the transformers baseline in one
# process; the baseline's image decodes are capped at 4 rows (132 of 1,055 steps) and extrapolated ("~").
# Results are printed as they come ("measured ...") and the whole log is written to $OUT (default .) as
# bench_7b_<part>.txt. Uses `python3` (or $PYTHON) with a CUDA torch and transformers already installed.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-targets}
py=${PYTHON:-python3}
out=${OUT:-.}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
common=(--config 7b --device cuda --dtype bf16 --attention sdpa --size 512x512 --compile both --repeats 2
        --baseline-steps 132)
case "$part" in
  targets) tasks=generate,understand ;;
  rest) tasks=generate-nocfg,edit ;;
  *) echo "usage: $0 [targets|rest]" >&2; exit 2 ;;
esac
$py -m bench "${common[@]}" --new-tokens 256 --tasks "$tasks" 2>&1 | tee "$out/bench_7b_$part.txt"
