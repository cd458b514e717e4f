"""Names shown to readers (tables and figures alike); no plotting imports, so table code can use them."""

from __future__ import annotations

MODE_ORDER = ("learned", "frozen", "none")
MODE_LABELS = {"learned": "QK-Norm, learned γ", "frozen": "QK-Norm, frozen γ=1", "none": "no QK-Norm"}
TENSOR_LABELS = {"q": "query", "k": "key"}


def ordered(modes) -> list[str]:
    """The modes present, in the order every table and legend uses."""
    present = set(modes)
    return [m for m in MODE_ORDER if m in present]


def format_tokens(tokens: float) -> str:
    """Human-readable token count: 983040 → '983k', 25_000_000 → '25M'."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(tokens) >= size:
            return f"{tokens / size:.3g}{unit}"
    return f"{tokens:g}"
