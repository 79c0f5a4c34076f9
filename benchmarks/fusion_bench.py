"""Time training the three fusion combiners on cached member features at the ensembling study's largest subset.

What `medmerge fuse train` does once the members' outputs are cached: 20,000 MedMCQA training questions (the
study's 20k subset) and 4,183 validation questions (MedMCQA's validation size), two members, four options. The
features are drawn so that member 0 is right 60% of the time and member 1 45% (random, seeded), so the combiners
have something to learn; what is measured is the CPU time of training (epochs until early stopping).

    python benchmarks/fusion_bench.py [--train 20000] [--validation 4183] [--members 2] [--epochs 200]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from medmerge.fusion.train import FusionConfig, fit_combiner
from medmerge_tasks.fusion.combiners import COMBINERS


def features(questions: int, members: int, options: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    gold = torch.randint(options, (questions,), generator=generator)
    rows = []
    for m in range(members):
        right = torch.rand(questions, generator=generator) < (0.6 - 0.15 * m)
        pick = torch.where(right, gold, torch.randint(options, (questions,), generator=generator))
        rows.append(2 * torch.randn(questions, options, generator=generator) + 3 * torch.nn.functional.one_hot(pick))
    return torch.stack(rows, dim=1), gold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--validation", type=int, default=4183)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=200)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    x, y = features(args.train + args.validation, args.members, 4, generator)
    n = args.train
    print(
        f"{args.train} training / {args.validation} validation questions, {args.members} members, 4 options, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(f"{'combiner':<12} {'epochs':>6} {'best':>5} {'s/epoch':>8} {'total s':>8} {'val acc':>8} {'start':>6}")
    for combiner in COMBINERS:
        members = [{"pretrained": str(i)} for i in range(args.members)]
        config = FusionConfig(members=members, combiner=combiner, epochs=args.epochs)
        start = time.perf_counter()
        _, log = fit_combiner(config, 4, x[:n], y[:n], x[n:], y[n:], seed=0)
        seconds = time.perf_counter() - start
        best = max(log, key=lambda e: (e.validation_accuracy, -e.validation_loss))
        print(
            f"{combiner:<12} {len(log) - 1:>6} {best.epoch:>5} {seconds / (len(log) - 1):>8.3f} {seconds:>8.1f} "
            f"{best.validation_accuracy:>8.4f} {log[0].validation_accuracy:>6.3f}"
        )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")


if __name__ == "__main__":
    main()
