"""Time a training step spends building its batch (examples + collate), stage by stage, on one core.

    python -m bench.train_data                      # 60 steps of each stage of the recipe's defaults
    python -m bench.train_data --steps 200 --stages 4

Building a batch is Python and NumPy on one core while the second waits, so every millisecond here is a
millisecond of each training step (a stage-4 step at two threads takes about 900 ms on the recipe's 2-core VM).
The steps are the recipe's own (`step_examples` at steps 0, 1, ... of each stage, seed 1, batch 32), drawn with
the bundled tiny model's tokenizer and config, so the caches start cold as in a run. The last line is
`batch build ms per step, stage 4: N.N`.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from wallaroo_nodes.engine.config import WallarooConfig
from wallaroo_nodes.engine.text import TextTokenizer
from wallaroo_nodes.engine.weights import CONFIG_FILE, TOKENIZER_FILE
from wallaroo_nodes.train.data import collate
from wallaroo_nodes.train.recipe import recipe_stages, resolve_run_options, step_examples

LAST_LINE = "batch build ms per step, stage 4: "


def main(argv: list[str] | None = None) -> int:
    """Print milliseconds per step spent building batches, per stage and task."""
    ap = argparse.ArgumentParser(prog="python -m bench.train_data", description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parent.parent / "wallaroo_nodes/models/tiny",
                    help="a model folder of the tiny architecture, for its tokenizer and config (default: the bundled one)")
    ap.add_argument("--steps", type=int, default=60, help="steps timed per stage (default 60)")
    ap.add_argument("--stages", default="0,1,2,3,4", help="comma-separated stage indices (default all five)")
    ap.add_argument("--seed", type=int, default=1, help="the run seed whose steps are drawn (the recipe's default: 1)")
    args = ap.parse_args(argv)
    if not (args.model / CONFIG_FILE).exists():
        ap.error(f"--model {args.model}: not a model folder (no {CONFIG_FILE})")
    stages = recipe_stages(resolve_run_options({}))
    try:
        chosen = [int(s) for s in args.stages.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--stages {args.stages!r}: give stage indices such as 0,4")
    if not chosen or any(not 0 <= i < len(stages) for i in chosen):
        ap.error(f"--stages {args.stages!r}: indices run from 0 to {len(stages) - 1}")
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    torch.set_num_threads(1)
    # Batches need the tokenizer and the config only, not the weights.
    cfg = WallarooConfig.load(args.model / CONFIG_FILE)
    tok = TextTokenizer(args.model / TOKENIZER_FILE, cfg.tokens)
    print(f"{'stage':<26} {'task':<11} {'steps':>5} {'ms/step':>8}")
    per_stage = {}
    for index in chosen:
        stage = stages[index]
        spent: dict[str, list[float]] = defaultdict(list)
        for step in range(args.steps):
            t0 = time.perf_counter()
            task, examples = step_examples(stage, index, step, args.seed, 0, stage.batch_size, tok, cfg)
            collate(examples, cfg)
            spent[task].append(time.perf_counter() - t0)
        for task, times in sorted(spent.items()):
            print(f"{stage.name:<26} {task:<11} {len(times):>5} {1000 * sum(times) / len(times):>8.1f}")
        all_times = [t for times in spent.values() for t in times]
        per_stage[index] = 1000 * sum(all_times) / len(all_times)
        print(f"{stage.name:<26} {'all':<11} {len(all_times):>5} {per_stage[index]:>8.1f}")
    if 4 in per_stage:
        print(f"{LAST_LINE}{per_stage[4]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
