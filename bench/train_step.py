"""Training-step speed of the recipe's stages, per task, with the CPU training attention paths side by side.

    python -m bench.train_step --threads 2                      # the bundled tiny model, batch 32, bf16 where native
    python -m bench.train_step --threads 1 --tasks edit --repeats 5

Each task's batch is the one stage 4 draws (grounded understanding, weighted edit start cells), on every canvas in
turn; a step is forward, backward and an AdamW update, timed after one untimed step per task and path. The paths
alternate step by step, so a change of load on the machine hits both:

  explicit  attention as matmul-softmax-matmul (`attention._explicit_attention`), what training uses on a CPU
  sdpa      torch's scaled_dot_product_attention (its math kernel: the masks rule out the others on a CPU)

The last line is `training step speedup explicit vs sdpa: N.NNx` (stage 4's task mix, seconds per step).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from wallaroo_nodes.engine import attention as attention_module
from wallaroo_nodes.engine.weights import load_model
from wallaroo_nodes.train.data import collate
from wallaroo_nodes.train.recipe import (ALL_CANVASES, GROUND_TWO_OBJECTS, default_stages, stage_trainer, step_context,
                                         task_examples, training_precision, with_grounding)

PATHS = ("explicit", "sdpa")
SPEEDUP_LINE = "training step speedup explicit vs sdpa: "


def main(argv: list[str] | None = None) -> int:
    """Print seconds per training step for each task and attention path, then stage 4's weighted speedup."""
    ap = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parent.parent / "wallaroo_nodes/models/tiny",
                    help="a model folder of the tiny architecture (default: the bundled one)")
    ap.add_argument("--tasks", default="generate,understand,edit", help="comma-separated subset of the three")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per task, path and canvas (default 3)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ("generate", "understand", "edit")]
    if unknown or not tasks:
        ap.error(f"--tasks: unknown {unknown}; choose from generate, understand, edit")
    if not (args.model / "config.json").exists():
        ap.error(f"--model {args.model}: not a model folder (no config.json)")

    device = torch.device("cpu")
    model, tok = load_model(args.model, dtype="fp32", device="cpu")
    model.train().requires_grad_(False)
    stage = with_grounding(default_stages(), readout_weight=1.0, two_object_weight=GROUND_TWO_OBJECTS)[4]
    trainer, params = stage_trainer(model, stage)
    opt = torch.optim.AdamW(params, lr=1e-5)
    precision = training_precision(device)

    def step(batch) -> float:
        t0 = time.perf_counter()
        with step_context(device, precision):
            loss, _ = trainer(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    print(f"model {args.model.name}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"precision {str(precision).removeprefix('torch.')}")
    print(f"{'task':<12}{'tokens':>8}" + "".join(f"{p + ' s/step':>16}" for p in PATHS) + f"{'speedup':>10}")
    per_task: dict[str, dict[str, float]] = {}
    try:
        for task in tasks:
            times: dict[str, list[float]] = {p: [] for p in PATHS}
            tokens = []
            for c, canvas in enumerate(ALL_CANVASES):
                batch = collate(task_examples(stage, task, canvas, random.Random(c), args.batch_size, tok, model.cfg),
                                model.cfg)
                tokens.append(batch.ids.numel())
                for i in range(args.repeats + 1):
                    for path in PATHS:
                        attention_module.EXPLICIT_TRAINING_ATTENTION = path == "explicit"
                        seconds = step(batch)
                        if i:  # the first step of each path warms its kernels up
                            times[path].append(seconds)
            per_task[task] = {p: statistics.median(v) for p, v in times.items()}
            row = per_task[task]
            print(f"{task:<12}{round(statistics.mean(tokens)):>8}" + "".join(f"{row[p]:>16.3f}" for p in PATHS)
                  + f"{row['sdpa'] / row['explicit']:>9.2f}x")
    finally:
        attention_module.EXPLICIT_TRAINING_ATTENTION = True
    mix = {t: w for t, w in stage.tasks.items() if t in per_task}
    total = sum(mix.values())
    weighted = {p: sum(w * per_task[t][p] for t, w in mix.items()) / total for p in PATHS}
    print(f"stage-4 mix ({', '.join(f'{t} {w:.2f}' for t, w in mix.items())}): "
          + ", ".join(f"{p} {weighted[p]:.3f} s/step" for p in PATHS))
    print(f"{SPEEDUP_LINE}{weighted['sdpa'] / weighted['explicit']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
