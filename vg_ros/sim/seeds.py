"""Seed lists for the simulator as the trainers and evaluators take them on the command line."""
from __future__ import annotations

import re


MAX_SEEDS = 1_000_000   # a run of the simulator per seed: far more is a typo (and a list that fills the memory)


def parse_seeds(text: str) -> list[int]:
    """'0-3,7,9-10' -> [0, 1, 2, 3, 7, 9, 10]. ValueError on anything else, and on more than MAX_SEEDS seeds."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"seeds: cannot parse {part!r} (use e.g. '0-23' or '1,4,9')")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"seeds: range {part!r} is empty")
        if len(seeds) + hi - lo + 1 > MAX_SEEDS:
            raise ValueError(f"seeds: {text!r} names more than {MAX_SEEDS:,} seeds")
        seeds.extend(range(lo, hi + 1))
    return seeds


def seed_runs(seeds) -> list[list[int]]:
    """The seed list cut into its runs of consecutive seeds, in order: [0, 1, 2, 7, 8] -> [[0, 1, 2], [7, 8]]."""
    runs: list[list[int]] = []
    for seed in (int(s) for s in seeds):
        if runs and runs[-1][-1] == seed - 1:
            runs[-1].append(seed)
        else:
            runs.append([seed])
    return runs


def format_seeds(seeds) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' ('none' when empty): model cards stay readable for 96 seeds, and
    `parse_seeds` reads it back."""
    runs = seed_runs(sorted(set(int(s) for s in seeds)))
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}" for run in runs) or "none"
