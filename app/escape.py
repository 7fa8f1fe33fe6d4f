"""The one place user text is made inert before it meets HTML.

Gradio renders toasts (`gr.Error`, `gr.Warning`, `gr.Info`) and Markdown as
sanitized HTML: scripts are stripped, but links and images stay live, so a
shared link with `?model=<img src=...>` echoed into a warning would fetch
the image. Every message or Markdown value that holds user input (URL
parameters, fields, uploads, API arguments) goes through one of these.
"""
from __future__ import annotations

import html
import re

# Markdown punctuation, and what starts an autolink ("http://", "www.", "a@b.c").
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>:/.@-])")


def escape_html(text) -> str:
    """Text for an HTML context (a toast): every tag and entity shown as typed."""
    return html.escape(str(text), quote=True)


def escape_md(text) -> str:
    """User text made inert in a Markdown component: HTML escaped, Markdown
    punctuation backslashed (so no link is made, not even an autolink of a
    bare URL), newlines as spaces."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def code_md(text) -> str:
    """Text for inside a Markdown code span: no backtick can end the span early."""
    return html.escape(" ".join(str(text).split()).replace("`", "'"), quote=False)
