"""Render the router evaluation's accuracy-vs-depth plot to HTML.

    python bench/plot_router_eval.py [bench/results/router_eval.json] [--out bench/results/router_eval.html]

Reads the JSON that `python -m polar_core evaluate --out X.md` writes beside
X.md; one figure per table (app.figures.accuracy_vs_depth), all in one page.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.figures import accuracy_vs_depth  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default="bench/results/router_eval.json")
    parser.add_argument("--out", default="bench/results/router_eval.html")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.data).read_text())
    parts = []
    for i, table in enumerate(data["tables"]):
        fig = accuracy_vs_depth(table["points"])
        fig.update_layout(title=table["title"])
        parts.append(fig.to_html(full_html=False, include_plotlyjs="cdn" if i == 0 else False))
    Path(args.out).write_text("<html><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
