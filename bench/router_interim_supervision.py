"""Interim router supervision from a fixed candidate set (NOT the MCTS search).

    python bench/router_interim_supervision.py --split train --per-family 16 --out /tmp/router_interim_train.json

Stop-gap while the search's supervision files (assets/supervision/) are not
there: each item is decoded (greedy, few-shot, as in the evaluation) under a
fixed set of 14 programs: the full program, ShortGPT drops of 1-6 layers,
Gromov drops of 2-4 layers, two single-layer skips and three 2-layer loops;
the valid ones (answer accepted by the checker) are written in the
reference's supervision format. A search explores far more programs, so this
under-reports valid programs. Delete once the search files exist.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_core.analysis import gromov_program, load_redundancy, shortgpt_program  # noqa: E402
from polar_core.evaluate import Runner  # noqa: E402
from polar_core.models import load_model  # noqa: E402
from polar_core.program import Program  # noqa: E402
from polar_core.supervision import SupervisionSample, save_supervision  # noqa: E402
from polar_core.tasks import FAMILIES, sample_items  # noqa: E402


def candidates(lm) -> list[Program]:
    depth = lm.num_layers
    red = load_redundancy(lm.name)
    order = red.block_influence.argsort().tolist()
    programs = [Program.full(depth)]
    programs += [shortgpt_program(red, n) for n in range(1, 7)]
    programs += [gromov_program(red, n) for n in (2, 3, 4)]
    programs += [Program.drop_layers(depth, [layer]) for layer in order[1:3]]
    programs += [Program.loop(depth, s, s + 1, 2) for s in (depth // 3, depth // 2, 2 * depth // 3)]
    return list(dict.fromkeys(programs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="train")
    parser.add_argument("--per-family", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    lm = load_model()
    items = [it for f in FAMILIES for it in sample_items(f, args.per_family, args.split)]
    programs = candidates(lm)
    runner = Runner(lm)
    runner.ensure([(it, p) for it in items for p in programs], desc="candidates")
    full = Program.full(lm.num_layers)
    samples = []
    for it in items:
        valid = [p for p in programs if runner.results[(it.id, p.path)][1]]
        invalid = [p for p in programs if not runner.results[(it.id, p.path)][1]]
        samples.append(SupervisionSample(it.question, it.answer, tuple(sorted(valid, key=len_of)), tuple(invalid),
                                         1.0 if full in valid else 0.0))
    save_supervision(samples, args.out)
    right = sum(s.initial_score for s in samples)
    shorter = sum(any(p.num_steps < lm.num_layers for p in s.valid_programs) for s in samples)
    print(f"{len(samples)} items, {len(programs)} programs each; full right {right:.0f}; "
          f"some shorter valid {shorter}; any valid {sum(bool(s.valid_programs) for s in samples)}")
    return 0


def len_of(p: Program) -> int:
    return p.num_steps


if __name__ == "__main__":
    sys.exit(main())
