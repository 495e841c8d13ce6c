import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests", ROOT / "sdk"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch

# Tests use tiny models; one thread avoids oversubscribing shared cores (several pytest processes,
# or a training run beside the suite) where multi-threaded BLAS spins and slows everyone down.
torch.set_num_threads(1)
