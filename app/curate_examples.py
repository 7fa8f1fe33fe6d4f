"""Choose the Learn tab's examples by measurement on the default model.

    python -m app.curate_examples [--model M]   # writes app/learn/<model>.json

Four lessons, each found by running candidates and keeping the first that
shows it, with the measured facts stored beside the text that explains them:

1. skip: the layers of lowest block influence can go, answer unchanged;
2. break: a program that cuts the top of the stack ruins the answer;
3. fix: a wrong answer that a different (skip or loop) program corrects;
4. emerge: the logit lens step where the answer first becomes the top token.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from app.handlers import learn_file
from polar_core.engine.generate import Stopping, Trace, generate
from polar_core.engine.models import DEFAULT_MODEL, load_model
from polar_core.program import Program
from polar_core.study import tasks
from polar_core.study.analysis import analyze
from polar_core.study.checker import check_answer
from polar_core.study.find import find_programs
from polar_core.study.redundancy import load_redundancy, shortgpt_program

SKIP_FAMILIES = ("capitals", "antonyms")
# What each lesson's card tells a student to look at (the page keeps the card beside the results).
LOOK = {
    "skip": "the two answers (no word highlighted: they are the same), the cost line (fewer layer calls per "
            "token), and how close the Alignment chart stays to 1.",
    "break": "the edited answer (highlighted: changed), its ✗, and the Answer-token probability chart: the "
             "edited program's line stays near 0 while the full program's rises in its last layers.",
    "fix": "the two marks (✗ for the full program, ✓ for the edited one) and the Logit lens: the rows near the "
           "top, where the edited program settles on its answer.",
    "emerge": "the Logit lens chart, from the bottom row (the first step) up: the outlined cells are the "
              "answer's token; it takes the first column (top-1) only in the last few steps.",
}
FIX_FAMILIES = ("add_1digit", "next_number", "word_problems")


def _answer(lm, prompt: str, program: Program) -> tuple[str, Trace]:
    trace = generate(lm, [prompt], program, max_new_tokens=16, chat=False, capture="last", stopping=Stopping(strings=("\n",)))[0]
    return trace.text.strip(), trace


def _right_items(lm, families, n):
    """Items of the families the full program answers right, with their answers."""
    full = Program.full(lm.num_layers)
    for family in families:
        for item in tasks.sample_items(family, n, "test"):
            text, trace = _answer(lm, tasks.build_prompt(item), full)
            if check_answer(text, item):
                yield item, text, trace


def _right_items_by_id(lm, item_ids):
    full = Program.full(lm.num_layers)
    for item in (tasks.get_item(i) for i in item_ids):
        text, trace = _answer(lm, tasks.build_prompt(item), full)
        if check_answer(text, item):
            yield item, text, trace


def lesson_skip(lm, like: str | None = None) -> dict:
    """The most ShortGPT layers that can go with the answer unchanged; with
    `like` (another model's lesson item), that item's prompt when this model
    answers it right, so the two models' lessons compare directly."""
    red = load_redundancy(lm.name)
    best = None
    candidates = _right_items(lm, SKIP_FAMILIES, 6)
    if like is not None:
        preferred = list(_right_items_by_id(lm, [like]))
        candidates = preferred or candidates
    for item, text, _ in candidates:
        prompt = tasks.build_prompt(item)
        for n in range(1, 13):
            program = shortgpt_program(red, n)
            if _answer(lm, prompt, program)[0] != text:
                break
            if best is None or n > best[0]:
                best = (n, item, text, program)
    if best is None:
        raise RuntimeError("no right answer survived skipping even one layer")
    n, item, text, program = best
    bi = [round(float(red.block_influence[i]), 4) for i in program.skipped_layers()]
    return dict(
        kind="skip", title=f"Skip {n} layers that barely change the hidden state",
        explanation=(f"Layers {', '.join(map(str, program.skipped_layers()))} change the hidden state least "
                     f"(block influence 1 − cos ≤ {max(bi):.3f}, measured over {red.num_prompts} prompts). "
                     f"Skipping all {n} of them leaves the answer “{text}” unchanged while running "
                     f"{program.layer_calls} of {lm.num_layers} layers. Compare the two answers and the "
                     "alignment curve."),
        look=LOOK["skip"],
        prompt=tasks.build_prompt(item), expected=item.answer, program=program.format(),
        facts=dict(item=item.id, answer=text, skipped=list(program.skipped_layers()), block_influence=bi,
                   layers=program.layer_calls),
    )


def lesson_break(lm) -> dict:
    """Cutting the top ten layers: the answer the full program gets right is lost."""
    program = Program.early_exit(lm.num_layers, lm.num_layers - 11)
    for item, text, full_trace in _right_items(lm, ("capitals",), 6):
        broken, trace = _answer(lm, tasks.build_prompt(item), program)
        if check_answer(broken, item):
            continue
        track = analyze(lm, trace, full_trace, expected=item.answer).lens.tracks["expected"]
        best = int(track.rank.min())
        return dict(
            kind="break", title="A program that breaks the answer",
            explanation=(f"The full program answers “{text}”. Stopping after layer {lm.num_layers - 11} "
                         f"(skipping the top ten layers) gives “{broken or '(nothing)'}”. In the logit lens the "
                         f"answer token “{track.token.strip()}” never gets better than rank {best} in the {program.layer_calls} "
                         "steps that remain: the last layers are the ones that turn the hidden state into it."),
            look=LOOK["break"],
            prompt=tasks.build_prompt(item), expected=item.answer, program=program.format(),
            facts=dict(item=item.id, full_answer=text, broken_answer=broken, layers=program.layer_calls,
                       answer_token=track.token, best_rank=best),
        )
    raise RuntimeError("no capitals item broke under early exit")


def lesson_fix(lm, budget: int = 80) -> dict:
    """A wrong answer some other program corrects (greedy search, checked by decoding)."""
    full = Program.full(lm.num_layers)
    for family in FIX_FAMILIES:
        for item in tasks.sample_items(family, 10, "test"):
            prompt = tasks.build_prompt(item)
            wrong, _ = _answer(lm, prompt, full)
            if check_answer(wrong, item):
                continue
            found = find_programs(lm, prompt, item.answer, method="greedy", budget=budget)
            if not found.programs:
                continue
            program = found.programs[0]
            right, _ = _answer(lm, prompt, program)
            loops = max(program.layer_counts()) > 1
            how = "loops a block of layers" if loops else f"skips {len(program.skipped_layers())} layers"
            return dict(
                kind="fix", title="A wrong answer that a different program corrects",
                explanation=(f"The full program answers “{wrong}”, which is wrong (expected {item.answer}). "
                             f"The program `{program.format()}` {how} and answers “{right}”. Such fixes are "
                             "found by search with the answer known; a router has to guess them from the "
                             "question alone, which is much harder."),
                look=LOOK["fix"],
                prompt=prompt, expected=item.answer, program=program.format(),
                facts=dict(item=item.id, full_answer=wrong, fixed_answer=right, layers=program.layer_calls,
                           search_budget=budget),
            )
    raise RuntimeError("no wrong item was corrected by search")


def lesson_emerge(lm) -> dict:
    """The item whose answer token becomes (and stays) the lens' top token earliest."""
    best = None
    for item, text, trace in _right_items(lm, SKIP_FAMILIES, 6):
        track = analyze(lm, trace, trace, expected=item.answer).lens.tracks.get("expected")
        if track is not None and track.top1_from is not None and (best is None or track.top1_from < best[0].top1_from):
            best = (track, item, text)
    if best is None:
        raise RuntimeError("no item had a stable top-1 answer token")
    track, item, text = best
    D, step = lm.num_layers, track.top1_from
    later = (f"the {D - step} layers after it keep it there" if step < D
             else "only the very last layer puts it there")
    return dict(
        kind="emerge", title="Where the answer first appears",
        explanation=(f"Open the logit lens tab: each step's hidden state decoded as if it were the last. The "
                     f"answer's first token “{track.token.strip()}” first reaches the top at step "
                     f"{track.first_top1} and stays there from step {step} (layer {step - 1}) of {D}; {later}. "
                     "Before that, the lens shows other guesses: the answer is built late in the stack."),
        look=LOOK["emerge"],
        prompt=tasks.build_prompt(item), expected=item.answer, program="full",
        facts=dict(item=item.id, answer=text, token=track.token, first_top1=track.first_top1, top1_from=step),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=None, help="default: app/learn/<model>.json")
    parser.add_argument("--like", type=Path, default=None,
                        help="another model's lessons: reuse their items where this model answers them right")
    args = parser.parse_args(argv)
    lm = load_model(args.model)
    started = time.perf_counter()
    like = {ex["kind"]: ex["facts"]["item"] for ex in json.loads(args.like.read_text())["examples"]} if args.like else {}
    examples = []
    for lesson in (lesson_skip, lesson_break, lesson_fix, lesson_emerge):
        examples.append(lesson(lm, like=like.get("skip")) if lesson is lesson_skip else lesson(lm))
        print(f"{examples[-1]['kind']:7s} {examples[-1]['facts']}", flush=True)
    data = {"command": "python -m app.curate_examples " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": args.model, "seconds": round(time.perf_counter() - started, 1), "examples": examples}
    out = args.out or learn_file(args.model)
    out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
