"""The paper's search statistics of supervision files, beside a lower-budget search of the same items.

Reads supervision files (``python -m polar_core search`` output, chunks
merged by question) and their ``.stats.json`` beside them, and reports:
right inputs (full program) with a shorter valid program (paper: 75.5%),
wrong inputs corrected by some program (CoLa: > 60%) and by a shorter one
(36.2%), the mean length of the shortest valid program, overall and per
family. ``--compare`` gives another search (e.g. budget 40) restricted to
the same questions, for a side-by-side reading of what the budget buys.

    python bench/supervision_stats.py --files polar_core/assets/supervision/smollm2_train_b200.json \
        --compare polar_core/assets/supervision/smollm2_train.json --out bench/results/supervision_b200.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_core.study.supervision import load_supervision, merge_samples  # noqa: E402
from polar_core.study.tables import wilson_interval  # noqa: E402
from polar_core.study.tasks import load_suite  # noqa: E402

DEPTH = 30  # SmolLM2-135M: the full program's steps


def statistics(samples) -> dict:
    """Counts and shares of the paper's statistics over `samples` (initial_score 1 = right under the full program)."""
    right = [s for s in samples if s.initial_score == 1.0]
    wrong = [s for s in samples if s.initial_score != 1.0]

    def shorter(s):
        return any(p.layer_calls < DEPTH for p in s.valid_programs)

    def share(part, whole):
        low, high = wilson_interval(part, whole) if whole else (None, None)
        return {"count": part, "n": whole, "share": round(part / whole, 4) if whole else None,
                "ci_low": low, "ci_high": high}

    found = [min(p.layer_calls for p in s.valid_programs) for s in samples if s.valid_programs]
    return {
        "items": len(samples),
        "right_with_shorter_valid": share(sum(map(shorter, right)), len(right)),
        "wrong_corrected_by_any": share(sum(bool(s.valid_programs) for s in wrong), len(wrong)),
        "wrong_corrected_by_shorter": share(sum(map(shorter, wrong)), len(wrong)),
        "mean_shortest_valid_steps": round(sum(found) / len(found), 3) if found else None,
        "items_with_valid": len(found),
        "mean_valid_programs": round(sum(len(s.valid_programs) for s in samples) / max(len(samples), 1), 3),
    }


def _pct(entry: dict) -> str:
    if entry["share"] is None:
        return "-"
    return (f"{100 * entry['share']:.1f}% ({entry['count']} of {entry['n']}; "
            f"95% CI {100 * entry['ci_low']:.1f}-{100 * entry['ci_high']:.1f}%)")


def _search_cost(files) -> dict:
    """Seconds and programs scored, summed over the files' statistics (a merged file's chunks each)."""
    seconds, programs, items, budgets = 0.0, 0.0, 0, set()
    for f in files:
        stats_file = Path(f).with_suffix(".stats.json")
        if not stats_file.is_file():
            continue
        stats = json.loads(stats_file.read_text())
        for s in stats.get("chunks", [stats]):  # a merged file lists its chunks' statistics
            seconds += s["seconds"]
            programs += s["mean_programs_scored"] * s["items"]
            items += s["items"]
            budgets.add(s["budget"])
    return {"seconds": round(seconds, 1), "programs_scored": round(programs), "items": items,
            "budgets": sorted(budgets)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="+", required=True, help="supervision files, merged by question")
    parser.add_argument("--compare", nargs="*", default=[], help="another search, read on the same questions")
    parser.add_argument("--out", default=None, help="markdown; the same figures as JSON beside it")
    args = parser.parse_args(argv)

    samples = merge_samples(*(load_supervision(f, DEPTH) for f in args.files))
    questions = {s.question for s in samples}
    other = [s for s in merge_samples(*(load_supervision(f, DEPTH) for f in args.compare)) if s.question in questions]
    family = {it.question: it.family for it in load_suite()}
    result = {"command": "python bench/supervision_stats.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "files": args.files, "compare": args.compare, "cost": _search_cost(args.files),
              "all": statistics(samples), "compare_all": statistics(other) if other else None, "families": {}}
    for fam in sorted({family[q] for q in questions}):
        result["families"][fam] = statistics([s for s in samples if family[s.question] == fam])
    text = _markdown(result)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _markdown(r: dict) -> str:
    a, c = r["all"], r["compare_all"]
    rows = [("right under the full program with a shorter valid program", "75.5%", "right_with_shorter_valid"),
            ("wrong inputs corrected by some program", "CoLa: > 60%", "wrong_corrected_by_any"),
            ("wrong inputs corrected by a shorter program", "36.2%", "wrong_corrected_by_shorter")]
    head = "| statistic | paper | this search |" + (" lower-budget search, same items |" if c else "")
    lines = [f"Command: `{r['command']}`", "",
             f"{a['items']} items; search cost (from the chunks' statistics): {r['cost']['seconds']} s, "
             f"{r['cost']['programs_scored']} programs scored, budgets {r['cost']['budgets']}.", "",
             head, "|---|---|---|" + ("---|" if c else "")]
    for label, paper, key in rows:
        lines.append(f"| {label} | {paper} | {_pct(a[key])} |" + (f" {_pct(c[key])} |" if c else ""))
    lines.append(f"| mean steps of the shortest valid program ({DEPTH} = full) | - | {a['mean_shortest_valid_steps']} "
                 f"({a['items_with_valid']} items have one) |"
                 + (f" {c['mean_shortest_valid_steps']} ({c['items_with_valid']} items) |" if c else ""))
    lines.append(f"| valid programs per item | - | {a['mean_valid_programs']} |"
                 + (f" {c['mean_valid_programs']} |" if c else ""))
    lines += ["", "| family | n | right with shorter valid | wrong corrected (any) | wrong corrected (shorter) | "
              "mean shortest valid |", "|---|---:|---|---|---|---:|"]
    for fam, f in r["families"].items():
        cells = [f"{f[k]['count']} / {f[k]['n']}" for k in
                 ("right_with_shorter_valid", "wrong_corrected_by_any", "wrong_corrected_by_shorter")]
        lines.append(f"| {fam} | {f['items']} | {' | '.join(cells)} | {f['mean_shortest_valid_steps']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
