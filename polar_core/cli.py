"""Command line: `python -m polar_core <command> ...`.

Every command turns a known error (bad program, bad prompt, a model that
will not load) into one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from polar_core.models import DEFAULT_MODEL

# Errors a user can cause; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def _cmd_run(args: argparse.Namespace) -> int:
    """Answer a prompt under a program and under the full program, side by side."""
    from polar_core.executor import generate
    from polar_core.models import load_model
    from polar_core.program import Program

    lm = load_model(args.model, device=args.device)
    program = Program.parse(args.program, lm.num_layers)
    full = Program.full(lm.num_layers)
    # Each program runs alone so that its time is its own.
    traces = {
        label: generate(lm, [args.prompt], p, max_new_tokens=args.max_new_tokens, chat=not args.plain)[0]
        for label, p in (("program", program), ("full", full))
    }
    info = lm.describe()
    print(f"model: {info['name']} ({info['family']}, {info['layers']} layers, {info['device']})")
    for label, t in traces.items():
        p = t.program
        print(
            f"{label:>7} [{p.format()}]: {p.num_steps} layers/token ({p.compute_fraction:.0%}), "
            f"{len(t.token_ids)} tokens in {t.total_seconds:.2f}s"
        )
        print(f"         answer: {t.text.strip()!r}")
    same = traces["program"].token_ids == traces["full"].token_ids
    print("answers are identical" if same else "answers differ")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # ModelLoadError and friends
        print(f"error: {exc}", file=sys.stderr)
        return 2
