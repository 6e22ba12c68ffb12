"""How figures are written in the report and the targets: rates, milliseconds, counts."""

from __future__ import annotations


def format_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.0f}k"


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"
