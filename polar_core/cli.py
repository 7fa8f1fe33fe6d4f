"""Command line: `python -m polar_core <command> ...`.

Every command turns a known error (bad program, bad prompt, a model that
will not load) into one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from polar_core.engine.generate import Stopping, generate
from polar_core.engine.models import DEFAULT_MODEL, load_model
from polar_core.program import Program
from polar_core.study import tasks
from polar_core.study.analysis import analyze
from polar_core.study.evaluate import measure_full_accuracy, run_evaluation
from polar_core.study.find import DECODE_MARGIN, RECHECK_TOTAL, search_task_items, summarize
from polar_core.study.prompts import PromptStyle, prompt_style, shown_answer
from polar_core.study.redundancy import measure_redundancy, save_redundancy
from polar_core.study.router import RouterConfig, default_router_path, load_router, save_router, train_router
from polar_core.study.router.familiarity import DEFAULT_QUANTILE
from polar_core.study.scoring import CASCADE_MARGIN, CascadeStats, bfloat16_twin, native_bfloat16
from polar_core.study.supervision import SupervisionSample, load_supervision, merge_samples, save_supervision
from polar_core.study.tables import report_markdown

# Errors a user can cause; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def _style(lm, prompt: str, plain: bool) -> PromptStyle:
    """The library's choice for the prompt (polar_core.study.prompts); --plain forces plain text."""
    style = prompt_style(lm, prompt)
    return dataclasses.replace(style, chat=False) if plain else style


def _cmd_run(args: argparse.Namespace) -> int:
    """Answer a prompt under a program and under the full program, side by side."""
    lm = load_model(args.model, device=args.device)
    program = Program.parse(args.program, lm.num_layers)
    style = _style(lm, args.prompt, args.plain)
    # Each program runs alone so that its time is its own.
    traces = {
        label: generate(lm, [style.text(args.prompt)], p, max_new_tokens=args.max_new_tokens, chat=style.chat,
                        stopping=Stopping(strings=style.stop_strings))[0]
        for label, p in (("program", program), ("full", Program.full(lm.num_layers)))
    }
    info = lm.describe()
    print(f"model: {info['name']} ({info['family']}, {info['layers']} layers, {info['device']})")
    for label, t in traces.items():
        p = t.program
        print(f"{label:>7} [{p.format()}]: {p.layer_calls} layer calls/token ({p.compute_fraction:.0%}), "
              f"{len(t.token_ids)} tokens in {t.total_seconds:.2f}s")
        print(f"         answer: {shown_answer(t.text, style)!r}")
    same = traces["program"].token_ids == traces["full"].token_ids
    print("answers are identical" if same else "answers differ")
    return 0


def _cmd_lens(args: argparse.Namespace) -> int:
    """Logit lens of a prompt under a program: per step, the top-1 token and the answer token's rank."""
    lm = load_model(args.model, device=args.device)
    program = Program.parse(args.program, lm.num_layers)
    style = _style(lm, args.prompt, args.plain)
    run = dict(max_new_tokens=args.max_new_tokens, chat=style.chat, capture="last",
               stopping=Stopping(strings=style.stop_strings))
    text = style.text(args.prompt)
    base = generate(lm, [text], None, **run)[0]
    trace = base if program.is_full else generate(lm, [text], program, **run)[0]
    result = analyze(lm, trace, base, expected=args.expected or None, k=args.k)
    print(f"program [{program.format()}]: {program.layer_calls} steps; answer: {shown_answer(trace.text, style)!r}")
    if not program.is_full:
        print(f"full program answer: {shown_answer(base.text, style)!r}")
    _print_lens(result, program)
    return 0


def _print_lens(result, program: Program) -> None:
    lens, tracks = result.lens, result.lens.tracks
    if result.lens_offset:
        print("the answer opens with a bare space token: the lens is taken one token on, where its first "
              "content token is chosen")
    for name, t in tracks.items():
        what = "first content token of the program's answer" if name == "answer" else "first content token of the expected answer"
        print(f"{name} token: {t.token!r} ({what})")
    header = f"{'step':>4} {'layer':>5}  {'top-1':<16} {'p':>6}"
    header += "".join(f"  {name + ' rank':>15} {name + ' p':>11}" for name in tracks)
    print(header)
    for i, layer in enumerate(program.path):
        line = f"{i + 1:>4} {layer:>5}  {lens.top_tokens[i][0]!r:<16} {lens.top_probs[i, 0].item():>6.3f}"
        line += "".join(f"  {t.rank[i].item():>15} {t.prob[i].item():>11.3f}" for t in tracks.values())
        print(line)
    for name, t in tracks.items():
        stays = f"step {t.top1_from} (layer {program.path[t.top1_from - 1]})" if t.top1_from else "never"
        first = f"step {t.first_top1} (layer {program.path[t.first_top1 - 1]})" if t.first_top1 else "never"
        print(f"{name} token {t.token!r}: first top-1 at {first}; top-1 for good from {stays}")
    if result.expected is not None:
        print(f"expected {result.expected!r} met: {result.expected_met} (full program: {result.baseline_expected_met})")


def _cmd_redundancy(args: argparse.Namespace) -> int:
    """Measure per-layer block influence and Gromov distances over task prompts; write JSON."""
    lm = load_model(args.model, device=args.device)
    families = args.families.split(",") if args.families else list(tasks.FAMILIES)
    per_family = -(-args.prompts // len(families))  # ceil: an even spread over families
    items = [it for f in families for it in tasks.sample_items(f, per_family, args.split)]
    items = items[: args.prompts]
    prompts = [tasks.build_prompt(it, shots=args.shots) for it in items]
    meta = {
        "command": "python -m polar_core " + shlex.join(args.argv),
        "prompt_source": f"polar_core.study.tasks {args.split} split, few-shot Q/A prompts, no chat template",
        "shots": args.shots,
        "families": families,
        "item_ids": [it.id for it in items],
        "token_position": "block_influence: mean over every prompt token; angular_distance and "
                          "block_influence_last: last prompt token",
    }
    red = measure_redundancy(lm, prompts, chat=False, meta=meta)
    save_redundancy(red, args.out)
    order = red.to_dict()["shortgpt_order"]
    print(f"{lm.name}: {red.num_prompts} prompts, {red.num_layers} layers -> {args.out}")
    print(f"lowest block influence (ShortGPT drop order): {order[:8]}")
    for n in (1, 2, 4, 8):
        if n < red.num_layers:
            start = red.most_redundant_block(n)
            print(f"most redundant block of {n}: layers {start}-{start + n - 1} "
                  f"(d = {red.angular_distance[n - 1, start]:.3f})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """Train a router on a supervision file and save it (config.json + model.safetensors)."""
    lm = load_model(args.model, device=args.device)
    samples = merge_samples(*(load_supervision(path, lm.num_layers) for path in args.supervision))
    if args.exclude_family:
        family = {it.question: it.family for it in tasks.load_suite()}
        samples = [s for s in samples if family.get(s.question) != args.exclude_family]
    config = dataclasses.replace(RouterConfig.for_model(lm), feature_layer=args.feature_layer, pooled=args.pooled,
                                 full_path_weight=args.full_path_weight)
    quantile = None if args.no_familiarity_gate else args.familiar_quantile
    router = train_router(lm, samples, config, epochs=args.epochs, seed=args.seed, lr=args.lr,
                          familiar_quantile=quantile)
    out = save_router(router, args.out)
    losses = router.loss_history
    # Provenance beside the checkpoint; load_router reads only config.json and the weights.
    (out / "training.json").write_text(json.dumps({
        "command": f"python -m polar_core {shlex.join(args.argv)}", "supervision": [str(p) for p in args.supervision],
        "samples": len(samples), "excluded_family": args.exclude_family, "epochs": args.epochs, "seed": args.seed,
        "lr": args.lr, "familiar_quantile": quantile, "parameters": router.num_parameters(),
        "loss_per_epoch": [round(x, 4) for x in losses],
    }, indent=1) + "\n")
    print(f"{len(samples)} samples, {router.num_parameters():,} parameters, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if router.config.familiar_bank:
        print(f"familiarity gate: {router.config.familiar_bank} training prompts kept; a prompt less similar than "
              f"{router.config.familiar_threshold:.4f} to all of them gets the full program")
    print(f"saved {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a router on the task suite against the full program, static baselines and search."""
    lm = load_model(args.model, device=args.device)
    router_dir = args.router or default_router_path(lm.name)
    router = load_router(router_dir, lm)
    test = load_supervision(args.supervision_test, lm.num_layers) if args.supervision_test else None
    train = (merge_samples(*(load_supervision(p, lm.num_layers) for p in args.supervision_train))
             if args.supervision_train else None)
    # The held-out-family router repeats the shipped router's training recipe (training.json).
    recipe_file = Path(router_dir) / "training.json"
    recipe = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    with _ray_pool(args) as pool:
        tables = run_evaluation(lm, router, split=args.split, test_samples=test, train_samples=train,
                                ood_family=args.ood_family, k=args.k, per_family=args.per_family or None,
                                epochs=args.epochs or recipe.get("epochs", 40), seed=recipe.get("seed", args.seed),
                                lr=recipe.get("lr", 1e-3), familiar_quantile=recipe.get("familiar_quantile"),
                                fallback=args.fallback, suggestions=args.suggestions,
                                leave_one_out=args.leave_one_out,
                                held_out_families=tasks.HELD_OUT_FAMILIES if args.held_out_families else (),
                                held_out_per_family=args.held_out_per_family or None, pool=pool)
    header = (f"Command: `python -m polar_core {shlex.join(args.argv)}`\n\n"
              f"Model: {lm.name} ({lm.num_layers} layers, {lm.device}); router: `{router_dir}` "
              f"({router.num_parameters():,} parameters, features at layer {router.config.feature_layer}"
              f"{', pooled' if router.config.pooled else ''}).\n")
    text = report_markdown(tables, header)
    if args.out:
        Path(args.out).write_text(text)
        # The same figures as data, with plot points for app.figures.accuracy_vs_depth.
        data = {"command": f"python -m polar_core {shlex.join(args.argv)}",
                "tables": [{**t.to_dict(), "points": t.points()} for t in tables]}
        Path(args.out).with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    print(text)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    """Search valid programs for task items (MCTS and/or greedy); save supervision and statistics."""
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    families = args.families or list(tasks.FAMILIES)
    items = search_items(families, args.per_family or None, args.split, skip=args.skip)
    methods = ["mcts", "greedy"] if args.method == "both" else [args.method]
    use_fast = args.fast == "bfloat16" or (args.fast == "auto" and lm.dtype == torch.float32
                                            and native_bfloat16(lm.device))
    fast = bfloat16_twin(lm) if use_fast else None
    cascade = CascadeStats()
    started = time.perf_counter()
    settings = dict(methods=methods, budget=args.budget, seed=args.seed, wave=args.wave,
                    recheck_invalid=args.recheck_invalid, recheck_total=args.recheck_total,
                    decode_margin=args.decode_margin)
    with _TwoStageBars(len(items) * len(methods)) as bars, _ray_pool(args) as pool:
        if pool is None:
            records = search_task_items(lm, items, **settings, fast=fast, cascade=cascade,
                                        progress=bars.search, check_progress=bars.check)
        else:  # a bar of items, as chunks come back from the workers (searched and checked there)
            bars.searches.reset(total=len(items))
            # Workers score in float32 (no bfloat16 twin travels to them); --recheck-total caps each chunk.
            fast = None
            records = pool.search_task_items(items, chunk=args.chunk, progress=bars.search, **settings)
    seconds = time.perf_counter() - started
    by_id = {it.id: it for it in items}
    samples = [
        SupervisionSample(by_id[r.item_id].question, by_id[r.item_id].answer, r.valid[: args.max_valid],
                          r.invalid[: args.max_invalid], 1.0 if r.initial_right else 0.0)
        for r in records
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_supervision(samples, out)
    info = lm.describe()
    stats = {"command": "python -m polar_core " + shlex.join(args.argv), "model": info["name"],
             "device": info["device"], "dtype": info["dtype"], "methods": methods, "budget": args.budget,
             "seed": args.seed, "wave": args.wave, "split": args.split, "families": families,
             "per_family": args.per_family, "skip": args.skip, "seconds": round(seconds, 1),
             "scoring": (f"bfloat16 pass, float32 for programs above margin -{CASCADE_MARGIN}" if fast is not None
                         else f"{info['dtype']} teacher forcing"),
             "programs_rescored_float32": cascade.rescored if fast is not None else None,
             "decode_margin": args.decode_margin, "recheck_invalid": args.recheck_invalid,
             "recheck_total": args.recheck_total,
             **summarize(records, lm.num_layers),
             "item_ids": [r.item_id for r in records]}
    stats_path = Path(args.stats) if args.stats else out.with_suffix(".stats.json")
    stats_path.write_text(json.dumps(stats, indent=1) + "\n")
    for key in ("items", "right_under_full", "right_with_shorter_valid", "wrong_under_full", "wrong_corrected_by_any",
                "wrong_corrected_by_shorter", "mean_shortest_valid_steps", "mean_programs_scored",
                "tf_valid_decode_agreement", "tf_invalid_decode_agreement", "seconds"):
        print(f"{key:28s} {stats[key]}")
    print(f"wrote {out} and {stats_path}")
    return 0


def _ray_pool(args: argparse.Namespace):
    """The Ray workers of --ray/--workers, as a context manager (None without --ray)."""
    if args.ray is None:
        return contextlib.nullcontext(None)
    from polar_core.study import distributed  # Ray is a heavy optional dependency: imported only with --ray

    address = None if args.ray == "local" else args.ray
    return distributed.WorkerPool(distributed.RaySettings(address=address, workers=args.workers, model=args.model,
                                                          device=args.device, dtype=getattr(args, "dtype", None)))


def _add_ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="spread the work over Ray workers: a cluster address (HOST:PORT, auto), or none "
                             "for a local Ray started for this run")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers, each holding one model (with --ray)")


def search_items(families, per_family: int | None, split: str, *, skip: int = 0) -> list[tasks.TaskItem]:
    """Items `skip` .. `skip + per_family` of each family's fixed sample (all after `skip` when
    per_family is None): a large search cut into chunks that never overlap and survive one by one."""
    stop = None if per_family is None else skip + per_family
    return [it for f in families for it in tasks.sample_items(f, stop, split)[skip:]]


class _TwoStageBars:
    """tqdm bars for a search: searches finished, then programs checked by decoding."""

    def __init__(self, searches: int):
        self.searches = tqdm(total=searches, desc="search", unit="search")
        self.checks: tqdm | None = None  # made when the second stage starts

    def search(self, done: int, total: int) -> None:
        self.searches.update(done - self.searches.n)

    def check(self, done: int, total: int) -> None:
        if self.checks is None:
            self.searches.close()
            self.checks = tqdm(total=total, desc="check by decoding", unit="program")
        self.checks.update(done - self.checks.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.searches.close()
        if self.checks is not None:
            self.checks.close()


def _cmd_baseline(args: argparse.Namespace) -> int:
    """The full program's greedy accuracy per task family; JSON report."""
    lm = load_model(args.model, device=args.device)
    report = measure_full_accuracy(lm, args.families, args.per_family or None, args.split, args.shots,
                                   args.batch_size)
    report = {"command": "python -m polar_core " + shlex.join(args.argv), **report}
    out = Path(args.out) if args.out else tasks.baseline_path(lm.name)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    """Items per task family and split."""
    for family in tasks.FAMILIES:
        counts = {split: len(tasks.load_suite(family, split)) for split in tasks.SPLITS}
        print(f"{family:16s} {counts}  {tasks.family_description(family)}")
    print(f"total {len(tasks.load_suite())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m polar_core", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="answer a prompt under a program and under the full program")
    run.add_argument("--prompt", required=True)
    run.add_argument("--program", default="full", help='layer program, e.g. "0-11, 12-15x2, 16-29"')
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--plain", action="store_true", help="plain text, no chat template")
    _add_model_args(run)
    run.set_defaults(func=_cmd_run)

    lens = commands.add_parser("lens", help="logit lens per step: top-1 token, answer-token rank and probability")
    lens.add_argument("--prompt", required=True)
    lens.add_argument("--program", default="full", help='layer program, e.g. "0-11, 12-15x2, 16-29"')
    lens.add_argument("--expected", default=None, help="expected answer, e.g. Paris")
    lens.add_argument("--k", type=int, default=5, help="top-k tokens per step")
    lens.add_argument("--max-new-tokens", type=int, default=32)
    lens.add_argument("--plain", action="store_true",
                      help="plain text (few-shot), no chat template; stops at a newline")
    _add_model_args(lens)
    lens.set_defaults(func=_cmd_lens)

    red = commands.add_parser("redundancy", help="measure per-layer redundancy (ShortGPT BI, Gromov distances)")
    red.add_argument("--out", required=True, help="JSON file to write")
    red.add_argument("--prompts", type=int, default=40, help="number of task prompts")
    red.add_argument("--split", default="train")
    red.add_argument("--families", default=None, help="comma-separated task families (default: all)")
    red.add_argument("--shots", type=int, default=3)
    _add_model_args(red)
    red.set_defaults(func=_cmd_redundancy)

    train = commands.add_parser("train", help="train a router on a supervision file")
    train.add_argument("--supervision", required=True, nargs="+",
                       help="supervision JSON files (the reference's format); several are merged by question")
    train.add_argument("--out", required=True, help="folder to write config.json and model.safetensors to")
    train.add_argument("--epochs", type=int, default=40)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--feature-layer", type=int, default=0, help="0 = token embeddings; k = after k layers")
    train.add_argument("--pooled", action="store_true", help="also give every layer query the prompt's mean feature")
    train.add_argument("--full-path-weight", type=float, default=RouterConfig.full_path_weight,
                       help="the full program's weight as a target where it is valid beside a shorter program "
                            "(higher: a more cautious router)")
    train.add_argument("--exclude-family", default=None, help="leave a task family out of training")
    train.add_argument("--familiar-quantile", type=float, default=DEFAULT_QUANTILE,
                       help="the fraction of training prompts the familiarity gate may call unfamiliar: a prompt "
                            "less similar to every training prompt than that gets the full program")
    train.add_argument("--no-familiarity-gate", action="store_true", help="keep no training-prompt summaries")
    _add_model_args(train)
    train.set_defaults(func=_cmd_train)

    ev = commands.add_parser("evaluate", help="evaluate a router on the task suite (top-1 beside best-of-k)")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--router", default=None, help="router folder (default: the shipped one)")
    ev.add_argument("--supervision-test", default=None, help="search results for the split (search oracle)")
    ev.add_argument("--supervision-train", default=None, nargs="+",
                    help="training files (merged), to train the held-out-family and leave-one-out routers")
    ev.add_argument("--ood-family", default=None, help="family to hold out of a second router's training")
    ev.add_argument("--k", type=int, default=5)
    ev.add_argument("--per-family", type=int, default=0, help="items per family (0 = all)")
    ev.add_argument("--epochs", type=int, default=0, help="epochs of the held-out-family router "
                    "(default: the shipped router's, from its training.json)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--fallback", action="store_true", help="add top-1 with a full-program fallback tuned on val")
    ev.add_argument("--suggestions", action="store_true", help="add the training-free suggestions (polar_core.study.suggest)")
    ev.add_argument("--leave-one-out", action="store_true",
                    help="train a router without each family in turn and evaluate it on that family")
    ev.add_argument("--held-out-families", action="store_true",
                    help=f"also evaluate on the question families no router saw ({', '.join(tasks.HELD_OUT_FAMILIES)})")
    ev.add_argument("--held-out-per-family", type=int, default=40, help="items per held-out family (0 = all)")
    ev.add_argument("--out", default=None, help="markdown file to write")
    _add_model_args(ev)
    _add_ray_args(ev)
    ev.set_defaults(func=_cmd_evaluate)

    search = commands.add_parser("search", help="search valid programs for task items; write supervision JSON")
    search.add_argument("--split", default="test", choices=("train", "val", "test"))
    search.add_argument("--families", nargs="*", default=None, help="task families (default: all)")
    search.add_argument("--per-family", type=int, default=10, help="items per family (0 = all)")
    search.add_argument("--skip", type=int, default=0,
                        help="skip each family's first SKIP sampled items (a later chunk of a large search)")
    search.add_argument("--method", default="mcts", choices=("mcts", "greedy", "influence", "both"),
                        help="mcts (PoLar/CoLa), greedy single edits, influence (candidates from this item's "
                             "layer influence, then shortened greedily); both = mcts then greedy")
    search.add_argument("--budget", type=int, default=200,
                        help="MCTS simulations / greedy or influence programs per item")
    search.add_argument("--wave", type=int, default=8, help="MCTS simulations scored per batch")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--max-valid", type=int, default=64, help="valid programs kept per item in the file")
    search.add_argument("--max-invalid", type=int, default=32, help="invalid programs kept per item in the file")
    search.add_argument("--out", required=True, help="supervision JSON to write")
    search.add_argument("--stats", default=None, help="statistics JSON (default: OUT with .stats.json)")
    search.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the model's default)")
    search.add_argument("--fast", default="auto", choices=("auto", "bfloat16", "none"),
                        help="score with a bfloat16 twin first, float32 where it is not clearly invalid "
                             "(auto: on a float32 model where bfloat16 is native)")
    search.add_argument("--recheck-invalid", type=int, default=1,
                        help="teacher-forced invalid programs per item re-checked by decoding (agreement statistic)")
    search.add_argument("--recheck-total", type=int, default=RECHECK_TOTAL,
                        help="at most this many re-checked invalid programs in all (per chunk with --ray)")
    search.add_argument("--decode-margin", type=float, default=DECODE_MARGIN,
                        help="decode teacher-forced valid programs whose margin is below this (inf: all)")
    search.add_argument("--chunk", type=int, default=16, help="items per Ray work unit (with --ray)")
    _add_model_args(search)
    _add_ray_args(search)
    search.set_defaults(func=_cmd_search)

    base = commands.add_parser("baseline", help="the full program's accuracy per task family (JSON report)")
    base.add_argument("--per-family", type=int, default=40, help="items per family (0 = all)")
    base.add_argument("--families", nargs="*", default=list(tasks.FAMILIES), choices=tasks.FAMILIES)
    base.add_argument("--split", choices=tasks.SPLITS, default=None, help="sample from one split only (default: all)")
    base.add_argument("--shots", type=int, default=3)
    base.add_argument("--batch-size", type=int, default=16)
    base.add_argument("--out", default=None, help="JSON file (default: the model's file in polar_core/assets/baselines/)")
    _add_model_args(base)
    base.set_defaults(func=_cmd_baseline)

    listing = commands.add_parser("tasks", help="items per task family and split")
    listing.set_defaults(func=_cmd_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that write files
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # ModelLoadError and friends
        print(f"error: {exc}", file=sys.stderr)
        return 2
