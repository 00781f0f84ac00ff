"""Plain-text tables for the terminal (and for pasting into docs/benchmarks.md as Markdown)."""

from __future__ import annotations


def format_table(title: str, columns: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    """A Markdown table under a title line, with its notes below it."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths)) + " |"

    out = [f"\n## {title}\n", line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    if not rows:
        out.append("(no rows)")
    out += [f"- {note}" for note in notes]
    return "\n".join(out)
