"""Text normalisation shared by the task suite and the answer checker:
unicode folded, case folded, quotes unified, edge punctuation trimmed."""
from __future__ import annotations

import re
import unicodedata

QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2212": "-", "`": "'"})
EDGE_PUNCT = " \t\"'.,;:!?()[]{}*_<>«»"
ARTICLES = ("the ", "a ", "an ")


def fold(text: str) -> str:
    """NFKC, then drop accents (é -> e) so spellings with and without them match."""
    text = unicodedata.normalize("NFKC", text)
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def basic(text: str) -> str:
    """Fold unicode and case, unify quotes, collapse whitespace, trim edge punctuation."""
    text = " ".join(fold(text).translate(QUOTES).casefold().split())
    return text.strip(EDGE_PUNCT)


def normalize_text(text: str) -> str:
    """Canonical form for word answers (see polar_core.study.checker)."""
    text = basic(text)
    for article in ARTICLES:
        if text.startswith(article):
            text = text[len(article):]
            break
    # "D.C." == "DC", "N'Djamena" == "Ndjamena", "Port-au-Prince" == "Port au Prince".
    text = re.sub(r"[.']", "", text)
    text = re.sub(r"[-,/]", " ", text)
    return " ".join(text.split())
