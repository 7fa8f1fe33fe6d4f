"""Hostile input at the handler level (issue 14): what a browser or API client
can send must end in one clear message, never an element, a crash or unbounded work."""
from __future__ import annotations

import re
from pathlib import Path

from app.escape import code_md, escape_html, escape_md

UI = Path(__file__).resolve().parents[2] / "app" / "ui.py"


def test_toasts_go_through_the_escaping_helpers():
    """Regression: `gr.Warning(f"{exc} ...")` quoted a URL parameter as live HTML.
    Every toast in app/ui.py is made by _error/_warn/_info, which escape."""
    source = UI.read_text(encoding="utf-8")
    calls = re.findall(r"gr\.(Error|Warning|Info)\((.*)", source)
    assert calls and all(arg.startswith("escape_html(") for _, arg in calls), calls


def test_escaping_leaves_no_tag_and_no_link():
    payload = '<a href="http://t.invalid/x">hi</a><img src=x> www.t.invalid me@t.invalid `code`'
    assert "<" not in escape_html(payload) and "<" not in escape_md(payload) and "<" not in code_md(payload)
    # Markdown autolinks bare URLs: no "http://", "www." or "@" survives unescaped.
    md = escape_md(payload)
    assert "http://" not in md and "www." not in md and "me@" not in md
    assert "`" not in code_md(payload)
