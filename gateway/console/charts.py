"""Charts as inline SVG, drawn on the server: no chart library, nothing fetched by the browser.

Each chart is an `<svg role="img">` with an `aria-label` and a `<title>` per mark, so a screen reader and a
mouse hover both get the numbers; the tables beside the charts carry the same figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

Fmt = Callable[[float], str]
_BAR_COLOUR = "#2f6db5"
_ERROR_COLOUR = "#c0392b"


def _plain(value: float) -> str:
    return f"{value:,.0f}"


def bars(items: Sequence[tuple[str, float]], *, label: str, fmt: Fmt = _plain, width: int = 560) -> Markup:
    """Horizontal bars, one per (name, value), largest first as given."""
    if not items:
        return Markup('<p class="empty">No data in this range.</p>')
    row_h, name_w, value_w = 22, 170, 110
    top = max((v for _, v in items), default=0.0) or 1.0
    span = width - name_w - value_w
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(label)}" width="{width}" '
        f'height="{row_h * len(items) + 4}" viewBox="0 0 {width} {row_h * len(items) + 4}">'
    ]
    for i, (name, value) in enumerate(items):
        y = i * row_h + 2
        w = max(1.0, span * value / top) if value > 0 else 0.0
        text = escape(fmt(value))
        parts.append(
            f"<g><title>{escape(name)}: {text}</title>"
            f'<text x="{name_w - 6}" y="{y + 15}" text-anchor="end" font-size="12">{escape(name[:26])}</text>'
            f'<rect x="{name_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{_BAR_COLOUR}"/>'
            f'<text x="{name_w + w + 6:.1f}" y="{y + 15}" font-size="12">{text}</text></g>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def columns(
    points: Sequence[tuple[str, float, float]],
    *,
    label: str,
    fmt: Fmt = _plain,
    width: int = 720,
    height: int = 180,
) -> Markup:
    """A time series as columns: (bucket label, total, errors); errors are drawn over the total in red."""
    if not points:
        return Markup('<p class="empty">No data in this range.</p>')
    pad_l, pad_b = 56, 22
    plot_w, plot_h = width - pad_l - 4, height - pad_b - 8
    top = max((t for _, t, _ in points), default=0.0) or 1.0
    step = plot_w / len(points)
    bar_w = max(1.0, step * 0.8)
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(label)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f'<text x="{pad_l - 6}" y="14" text-anchor="end" font-size="11">{escape(fmt(top))}</text>',
        f'<text x="{pad_l - 6}" y="{8 + plot_h}" text-anchor="end" font-size="11">0</text>',
        f'<line x1="{pad_l}" y1="{8 + plot_h}" x2="{width - 4}" y2="{8 + plot_h}" stroke="#888"/>',
    ]
    every = max(1, len(points) // 6)
    for i, (name, total, errors) in enumerate(points):
        x = pad_l + i * step
        h = plot_h * total / top
        eh = plot_h * errors / top
        tip = f"{name}: {fmt(total)}" + (f", {fmt(errors)} errors" if errors else "")
        parts.append(
            f"<g><title>{escape(tip)}</title>"
            f'<rect x="{x:.1f}" y="{8 + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
            f'fill="{_BAR_COLOUR}"/>'
        )
        if eh > 0:
            parts.append(
                f'<rect x="{x:.1f}" y="{8 + plot_h - eh:.1f}" width="{bar_w:.1f}" height="{eh:.1f}" '
                f'fill="{_ERROR_COLOUR}"/>'
            )
        parts.append("</g>")
        if i % every == 0:
            parts.append(f'<text x="{x:.1f}" y="{height - 6}" font-size="10">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
