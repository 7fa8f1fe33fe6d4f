"""Evaluation results as tables: data first (a pandas DataFrame), rendered as
markdown, JSON records or a page table from the same frame.

Honesty is checked whenever a table is built or rendered: an oracle row
(one that needs the ground truth to pick, e.g. a router's best-of-k) must
say so in its label and must come right after the deployable top-1 row of
the same router (``check_honest``). Every accuracy carries its 95% Wilson
score interval: with n = 64, a difference of three items is noise, and the
table should say so rather than the reader having to.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

ORACLE_TAG = "(oracle)"
COLUMNS = ("method", "group", "n", "correct", "accuracy", "ci_low", "ci_high", "layer_calls", "compute_fraction",
           "oracle", "best_of_k_of", "note")
Z95 = 1.959963984540054  # the standard normal quantile of 0.975


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct / n (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is sensible
    at 0/n and n/n, which small per-family tables hit often.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in 0..n, got {correct} of {n}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


class HonestyError(ValueError):
    """A result that would show an oracle figure without its deployable twin."""


@dataclass(frozen=True)
class MethodRow:
    """One method's result on a set of items."""

    method: str
    group: str  # rows of one router share a group (its top-1 and its best-of-k)
    n: int
    correct: int
    total_layer_calls: int  # layer calls per token, summed over the items
    num_layers: int  # the model's depth D
    oracle: bool = False
    best_of_k_of: str | None = None  # for a best-of-k row: the label of its top-1 row
    note: str = ""

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def ci_low(self) -> float:
        """Lower end of the accuracy's 95% Wilson interval."""
        return wilson_interval(self.correct, self.n)[0]

    @property
    def ci_high(self) -> float:
        """Upper end of the accuracy's 95% Wilson interval."""
        return wilson_interval(self.correct, self.n)[1]

    @property
    def layer_calls(self) -> float:
        """Layer calls per token, mean over the items."""
        return self.total_layer_calls / self.n if self.n else 0.0

    @property
    def compute_fraction(self) -> float:
        """Mean layer calls per token relative to the full program."""
        return self.layer_calls / self.num_layers


def check_honest(rows: Sequence[MethodRow]) -> None:
    """Raise HonestyError unless every oracle row says so and every best-of-k
    row comes right after the deployable top-1 row of the same router."""
    for i, row in enumerate(rows):
        if row.oracle and ORACLE_TAG not in row.method:
            raise HonestyError(f"oracle row {row.method!r} must say {ORACLE_TAG} in its label")
        if row.best_of_k_of is None:
            continue
        if not row.oracle:
            raise HonestyError(f"best-of-k row {row.method!r} needs the ground truth: mark it oracle")
        above = rows[i - 1] if i > 0 else None
        if above is None or above.method != row.best_of_k_of or above.oracle or above.n != row.n:
            raise HonestyError(
                f"best-of-k row {row.method!r} must come right after its top-1 row {row.best_of_k_of!r} "
                "on the same items: never report best-of-k without top-1"
            )


@dataclass(frozen=True)
class EvalTable:
    """Rows of one evaluation, checked for honesty when built."""

    title: str
    rows: tuple[MethodRow, ...]
    notes: tuple[str, ...] = ()
    facts: dict = field(default_factory=dict)  # measurements beside the rows (JSON only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "notes", tuple(self.notes))
        check_honest(self.rows)

    def row(self, method: str) -> MethodRow:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(method)

    def frame(self) -> pd.DataFrame:
        """One row per method, the columns of COLUMNS."""
        check_honest(self.rows)
        return pd.DataFrame([{c: getattr(r, c) for c in COLUMNS} for r in self.rows], columns=list(COLUMNS))

    def to_markdown(self) -> str:
        df = self.frame()
        deployable = (df["group"] == "router") & ~df["oracle"]
        shown = pd.DataFrame({
            "Method": [f"**{m}**" if bold else m for m, bold in zip(df["method"], deployable)],
            "Accuracy": df["accuracy"].map("{:.1%}".format),
            "95% CI": [f"{lo:.1%}-{hi:.1%}" for lo, hi in zip(df["ci_low"], df["ci_high"])],
            "Correct / n": [f"{c} / {n}" for c, n in zip(df["correct"], df["n"])],
            "Layer calls / token": df["layer_calls"].map("{:.2f}".format),
            "% of full compute": df["compute_fraction"].map("{:.1%}".format),
            "Note": df["note"],
        })
        lines = [f"### {self.title}", "", shown.to_markdown(index=False, colalign=("left",) + ("right",) * 5 + ("left",))]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def to_dict(self) -> dict:
        # Missing values (e.g. best_of_k_of for a top-1 row) as None: strict JSON has no NaN.
        frame = self.frame()
        rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
        return {"title": self.title, "notes": list(self.notes), **self.facts, "rows": rows}

    def points(self) -> list[dict]:
        """Plot data for ``app.figures.accuracy_vs_depth`` (one point per row)."""
        df = self.frame()
        return [{"method": r.method, "accuracy": r.accuracy, "ci_low": r.ci_low, "ci_high": r.ci_high,
                 "layer_calls": r.layer_calls, "oracle": r.oracle, "family": r.group} for r in df.itertuples()]


def report_markdown(tables: Sequence[EvalTable], header: str = "") -> str:
    """The tables as one markdown document."""
    parts = [header.rstrip() + "\n"] if header else []
    parts += [t.to_markdown() for t in tables]
    return "\n".join(parts)
