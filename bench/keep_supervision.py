"""Supervision from the model's own answers: for every train item, the
programs verified (teacher forcing, ``polar_core.study.suggest``) to keep the
full program's answer on its few-shot prompt, right or wrong.

The searched files (``assets/supervision/smollm2_train*.json``) call a
program valid when it gives the *correct* answer, so an input the full
program gets wrong and no program corrects (639 of 1,168 train items) teaches
the router nothing. Here "valid" means "gives the full program's answer"
(``gt_ans`` is that answer, ``initial_score`` 1.0): every item has targets,
and they say which layers *this* input can spare without changing what the
model says. A router that imitated them exactly would have the full
program's accuracy at less compute.

Measured (``bench/results/router_val_keep.json``): it does not imitate them
from the prompt. Trained on this file alone, the router gives the full
program's answer on 146-275 of 282 val items and is right on 51-80 at
90.3-99.5% of the layers, below the searched files' 73 at 90.6%: which
layers an input can spare is not in its token embeddings.

    python bench/keep_supervision.py --split train --candidates 48 \\
        --out polar_core/assets/supervision/smollm2_train_keep.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar_core.engine.models import load_model  # noqa: E402
from polar_core.study.suggest import suggest_many  # noqa: E402
from polar_core.study.tasks import FAMILIES, build_prompt, sample_items  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="train", choices=("train", "val", "test"))
    ap.add_argument("--per-family", type=int, default=0, help="items per family (0 = all)")
    ap.add_argument("--candidates", type=int, default=48, help="programs verified per item")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    items = [it for fam in FAMILIES for it in sample_items(fam, args.per_family or None, args.split)]
    samples, started, shorter = [], time.perf_counter(), 0
    bar = tqdm(total=len(items), desc="answer-keeping programs", unit="item")
    for lo in range(0, len(items), 16):
        chunk = items[lo : lo + 16]
        found = suggest_many(lm, [build_prompt(it) for it in chunk], k=args.candidates,
                             max_candidates=args.candidates)
        for item, f in zip(chunk, found):
            if not f.answer_ids:
                continue  # the full program wrote nothing to keep
            shorter += bool(f.suggestions)
            samples.append({"question": item.question, "gt_ans": f.answer_text.strip(), "initial_score": 1.0,
                            "final_valid_transitions": [list(s.program.path) for s in f.suggestions],
                            "candidates": f.candidates})
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - started
    meaning = ("valid = keeps the full program's answer (gt_ans is the full program's own answer, verified by "
               "teacher forcing), not the correct answer")
    Path(args.out).write_text(json.dumps({"num_layers": lm.num_layers, "meaning": meaning, "samples": samples}) + "\n")
    stats = {"command": "python " + " ".join(sys.argv), "meaning": meaning, "items": len(items),
             "samples": len(samples), "with_a_shorter_program": shorter, "seconds": round(seconds, 1),
             "mean_shortest_layer_calls": round(sum(min((len(p) for p in s["final_valid_transitions"]),
                                                        default=lm.num_layers) for s in samples) / len(samples), 2)}
    Path(args.out).with_suffix(".stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
