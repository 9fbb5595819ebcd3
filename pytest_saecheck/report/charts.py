"""Small dependency-free SVG charts for the HTML report.

Every function returns an SVG fragment as :class:`markupsafe.Markup`; every piece of text in it is escaped
here, so callers may pass untrusted labels. Charts are plain shapes with presentation attributes: no script,
no external reference, no font download.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape
from typing import TypeVar

from markupsafe import Markup

from pytest_saecheck.messages import fmt_tick
from pytest_saecheck.scaling import ScalingLaw

PALETTE = {
    "axis": "#555",
    "grid": "#e3e3e3",
    "text": "#222",
    "primary": "#1f5fa8",
    "secondary": "#c46210",
    "bar": "#5b8fc7",
    "dead": "#b03030",
    "zero": "#888",
}
#: One colour per SAE in charts that mark several (distinct from the axis, text and the law's own colour), in
#: order; a chart with more SAEs than colours starts again at the first.
SAE_COLOURS: tuple[str, ...] = (
    "#c46210",
    "#b03030",
    "#2a8a5e",
    "#7b4fa0",
    "#b8860b",
    "#d6336c",
    "#4a7f9e",
    "#6b6b3a",
)
#: The width of one character of :data:`FONT` in SVG units, rounded up, for sizing a chart to its longest text.
CHAR_WIDTH = 6.6
FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" font-size="11"'
#: Line attributes of a series drawn under another (wide, light, dashed) so that the one on top stays visible.
UNDERLAY: Mapping[str, str] = {"stroke-width": "4", "stroke-opacity": "0.45", "stroke-dasharray": "6 3"}
#: ``(name, values, colour)``, or with a fourth item: SVG attributes of its line (e.g. :data:`UNDERLAY`).
Series = tuple[str, Sequence[float | None], str] | tuple[str, Sequence[float | None], str, Mapping[str, str]]
#: ``(name, [low, high] or None per x, colour)``: an interval band.
Band = tuple[str, Sequence[Sequence[float | None] | None], str]
_Value = TypeVar("_Value")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (about ``count`` of them)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high < low:
        low, high = high, low
    if high == low:
        spread = abs(low) * 0.1 or 1.0
        low, high = low - spread, high + spread
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    start = math.floor(low / step + 1e-9) * step
    ticks: list[float] = []
    value = start
    while value <= high + step * 0.5 and len(ticks) < 50:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _svg(width: int, height: int, title: str, body: list[str]) -> Markup:
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" {FONT}><title>{escape(title)}</title>' + "".join(body) + "</svg>"
    )


def _empty(width: int, height: int, title: str, message: str) -> Markup:
    return _svg(
        width,
        height,
        title,
        [
            f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" fill="#fafafa" stroke="{PALETTE["grid"]}"/>',
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="{PALETTE["axis"]}">{escape(message)}</text>',
        ],
    )


def _band_intervals(band: Band | None) -> list[tuple[float, float] | None]:
    """A band's ``(low, high)`` per x, None where it has no interval."""
    out: list[tuple[float, float] | None] = []
    for value in band[1] if band else ():
        low, high = (value[0], value[1]) if value is not None and len(value) == 2 else (None, None)
        out.append((float(low), float(high)) if low is not None and high is not None else None)
    return out


#: The plot area's margins inside a chart (SVG units): room for the y ticks, the legend and the x axis.
_LEFT, _RIGHT, _TOP, _BOTTOM = 58, 16, 26, 40

_Scale = Callable[[float], float]


def _y_grid(ticks: Sequence[float], sy: _Scale, plot_w: float, *, zero: bool) -> list[str]:
    """A horizontal grid line and a label per y tick (the line at 0 darker when ``zero``)."""
    body: list[str] = []
    for tick in ticks:
        y = sy(tick)
        colour = PALETTE["zero"] if zero and tick == 0 else PALETTE["grid"]
        body.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}"/>')
        body.append(
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{PALETTE["axis"]}">{escape(fmt_tick(tick))}</text>'
        )
    return body


def _axes(plot_w: float, plot_h: float, x_label: str, x_label_y: float, y_label: str) -> str:
    """The y and x axis lines and their labels (``x_label`` escaped here, ``y_label`` too)."""
    return (
        f'<line x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{_TOP + plot_h}" stroke="{PALETTE["axis"]}"/>'
        f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h}" stroke="{PALETTE["axis"]}"/>'
        f'<text x="{_LEFT + plot_w / 2}" y="{x_label_y}" text-anchor="middle" fill="{PALETTE["axis"]}">{escape(x_label)}</text>'
        f'<text transform="translate(14 {_TOP + plot_h / 2}) rotate(-90)" text-anchor="middle" fill="{PALETTE["axis"]}">'
        f"{escape(y_label)}</text>"
    )


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 640,
    height: int = 240,
    band: Band | None = None,
    markers: Sequence[tuple[float, str]] = (),
) -> Markup:
    """Lines over integer x = 0, 1, 2, ...; ``None`` values leave gaps. Drawn in order: the last is on top.

    ``series``: ``(name, values, colour)`` or ``(name, values, colour, line attributes)``. ``band``: ``(name,
    [low, high] or None per x, colour)``, a shaded interval drawn under the lines (gaps where None).
    ``markers``: ``(x, label)`` vertical dashed lines, e.g. the SAE's training context.
    """
    band_values = [(x, value) for x, value in enumerate(_band_intervals(band)) if value is not None]
    points = [(x, y) for entry in series for x, y in enumerate(entry[1]) if y is not None]
    points += [(x, bound) for x, value in band_values for bound in value]
    if not points:
        return _empty(width, height, title, "no data")
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    n = max(len(entry[1]) for entry in series)
    y_values = [y for _, y in points]
    y_ticks = nice_ticks(min(0.0, min(y_values)), max(0.0, max(y_values)))
    y_low, y_high = y_ticks[0], y_ticks[-1]
    x_ticks = [t for t in nice_ticks(0, max(1, n - 1), 8) if 0 <= t <= n - 1 and t == int(t)]

    def sx(x: float) -> float:
        return _LEFT + (x / max(1, n - 1)) * plot_w

    def sy(y: float) -> float:
        return _TOP + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    body = _y_grid(y_ticks, sy, plot_w, zero=True)
    for tick in x_ticks:
        x = sx(tick)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h + 4}" stroke="{PALETTE["axis"]}"/>'
        )
        body.append(
            f'<text x="{x:.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle" fill="{PALETTE["axis"]}">{int(tick)}</text>'
        )
    body.append(_axes(plot_w, plot_h, x_label, height - 6, y_label))
    legend_x = _LEFT + plot_w
    if band is not None and band_values:
        body += _band_shapes(band, sx, sy)
        legend_x -= 8 + 7 * len(band[0]) + 16
        body.append(
            f'<rect x="{legend_x}" y="6" width="14" height="8" fill="{band[2]}" fill-opacity="0.3"/>'
            f'<text x="{legend_x + 18}" y="14" fill="{PALETTE["text"]}">{escape(band[0])}</text>'
        )
    for x_mark, label in markers:
        if not 0 <= x_mark <= n - 1:
            continue
        x = sx(x_mark)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" stroke="{PALETTE["dead"]}" '
            f'stroke-dasharray="4 3"/>'
            f'<text x="{x - 4:.1f}" y="{_TOP + 12}" text-anchor="end" fill="{PALETTE["dead"]}">{escape(label)}</text>'
        )
    for entry in series:
        name, colour = entry[0], entry[2]
        style = {"stroke-width": "1.8", **(entry[3] if len(entry) > 3 else {})}
        line_style = " ".join(f'{key}="{escape(str(value))}"' for key, value in style.items())
        body += _series_shapes(entry[1], colour, line_style, sx, sy)
        y = 14
        legend_x -= 8 + 7 * len(name) + 16
        body.append(
            f'<line x1="{legend_x}" x2="{legend_x + 14}" y1="{y - 4}" y2="{y - 4}" stroke="{colour}" {line_style}/>'
            f'<text x="{legend_x + 18}" y="{y}" fill="{PALETTE["text"]}">{escape(name)}</text>'
        )
    return _svg(width, height, title, body)


def _runs(values: Sequence[_Value | None]) -> list[list[tuple[int, _Value]]]:
    """The runs of consecutive ``(x, value)`` between the Nones of ``values`` (empty runs included)."""
    runs: list[list[tuple[int, _Value]]] = [[]]
    for x, value in enumerate(values):
        if value is None:
            runs.append([])
        else:
            runs[-1].append((x, value))
    return runs


def _band_shapes(band: Band, sx: _Scale, sy: _Scale) -> list[str]:
    """A shaded polygon per run of intervals, a short bar for a lone one."""
    body: list[str] = []
    for run in _runs(_band_intervals(band)):
        if not run:
            continue
        if len(run) == 1:  # a lone position: a short bar
            ((x, (low, high)),) = run
            body.append(
                f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(low):.1f}" y2="{sy(high):.1f}" '
                f'stroke="{band[2]}" stroke-opacity="0.35" stroke-width="4"/>'
            )
            continue
        upper = [f"{sx(x):.1f},{sy(value[1]):.1f}" for x, value in run]
        lower = [f"{sx(x):.1f},{sy(value[0]):.1f}" for x, value in reversed(run)]
        body.append(
            f'<polygon fill="{band[2]}" fill-opacity="0.18" stroke="none" points="{" ".join(upper + lower)}"/>'
        )
    return body


def _series_shapes(
    values: Sequence[float | None], colour: str, line_style: str, sx: _Scale, sy: _Scale
) -> list[str]:
    """A polyline per run of values, a dot for a lone one."""
    body: list[str] = []
    for run in _runs(values):
        points = [f"{sx(x):.1f},{sy(point):.1f}" for x, point in run]
        if len(points) > 1:
            body.append(f'<polyline fill="none" stroke="{colour}" {line_style} points="{" ".join(points)}"/>')
        elif len(points) == 1:
            cx, cy = points[0].split(",")
            body.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
    return body


def density_ticks(edges: Sequence[float]) -> list[tuple[int, float]]:
    """``(index, log10 edge)`` of the labelled edges: whole decades, or every edge when fewer than 3 decades show."""
    decades = [(index, edge) for index, edge in enumerate(edges) if edge == int(edge)]
    if len(decades) >= 3:
        return decades
    step = max(1, math.ceil(len(edges) / 9))  # at most about 9 labels
    return [(index, edge) for index, edge in enumerate(edges) if (len(edges) - 1 - index) % step == 0]


def density_label(log10_edge: float) -> str:
    """A firing density at a bin edge for people: ``1``, ``0.1``, ``0.56``, ``1e-5``."""
    if log10_edge == 0:
        return "1"
    if log10_edge == int(log10_edge):
        return f"1e{int(log10_edge)}" if log10_edge < -2 else f"{10**log10_edge:g}"
    value = 10**log10_edge
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.1e}"


def density_histogram(
    histogram: dict | None, *, title: str = "Latent firing density", width: int = 640, height: int = 240
) -> Markup:
    """Bars of latent counts over log10(firing density) bins, with a separate bar for dead latents."""
    if not histogram or not histogram.get("counts"):
        return _empty(width, height, title, "no latent density recorded")
    edges: list[float] = list(histogram["log10_edges"])
    counts: list[int] = list(histogram["counts"])
    dead = int(histogram.get("dead", 0))
    left, right, top, bottom = 58, 16, 26, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    slots = len(counts) + 2  # a gap, then the dead bar on the left
    slot_w = plot_w / slots
    y_ticks = nice_ticks(0, max([*counts, dead, 1]), 4)
    y_high = y_ticks[-1]

    def sy(value: float) -> float:
        return top + (1 - value / y_high) * plot_h

    body: list[str] = []
    for tick in y_ticks:
        y = sy(tick)
        body.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{PALETTE["grid"]}"/>'
        )
        body.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{PALETTE["axis"]}">{escape(fmt_tick(tick))}</text>'
        )
    bars = [("dead", dead, PALETTE["dead"], 0)] + [
        (f"10^{edges[i]:g} to 10^{edges[i + 1]:g}", c, PALETTE["bar"], i + 2) for i, c in enumerate(counts)
    ]
    for label, value, colour, slot in bars:
        x = left + slot * slot_w + 1
        y = sy(value)
        body.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(1.0, slot_w - 2):.1f}" height="{top + plot_h - y:.1f}" '
            f'fill="{colour}"><title>{escape(label)}: {value} latents</title></rect>'
        )
    body.append(
        f'<text x="{left + 1.5 * slot_w:.1f}" y="{top + plot_h + 16}" text-anchor="end" fill="{PALETTE["dead"]}">dead</text>'
    )
    for index, edge in density_ticks(edges):
        x = left + (index + 2) * slot_w
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="{PALETTE["axis"]}"/>'
        )
        body.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle" fill="{PALETTE["axis"]}">{escape(density_label(edge))}</text>'
        )
    body.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="{PALETTE["axis"]}"/>'
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" fill="{PALETTE["axis"]}">'
        "fraction of tokens on which a latent fires (log scale)</text>"
        f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle" fill="{PALETTE["axis"]}">'
        "latents</text>"
    )
    return _svg(width, height, title, body)


def loss_scale(metrics: dict[str, float], *, width: int = 640, height: int = 106) -> Markup:
    """The four cross-entropies on one axis in nats, so the spliced model's loss is seen on an honest scale."""
    marks = [
        ("original", metrics.get("ce_orig"), PALETTE["text"]),
        ("SAE spliced", metrics.get("ce_sae"), PALETTE["primary"]),
        ("mean-ablated", metrics.get("ce_mean"), PALETTE["secondary"]),
        ("zero-ablated", metrics.get("ce_zero"), PALETTE["dead"]),
    ]
    known = [(name, value, colour) for name, value, colour in marks if value is not None]
    title = "Cross-entropy (nats/token) of the original, spliced and ablated model"
    if not known:
        return _empty(width, height, title, "no cross-entropy recorded")
    left, right = 20, 20
    ticks = nice_ticks(min(0.0, *(v for _, v, _ in known)), max(v for _, v, _ in known), 8)
    low, high = ticks[0], ticks[-1]
    axis_y = 72

    def sx(value: float) -> float:
        return left + (value - low) / (high - low) * (width - left - right)

    body = [
        f'<line x1="{left}" x2="{width - right}" y1="{axis_y}" y2="{axis_y}" stroke="{PALETTE["axis"]}"/>'
    ]
    for tick in ticks:
        x = sx(tick)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{axis_y}" y2="{axis_y + 4}" stroke="{PALETTE["axis"]}"/>'
        )
        body.append(
            f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle" fill="{PALETTE["axis"]}">{escape(fmt_tick(tick))}</text>'
        )
    orig, sae = metrics.get("ce_orig"), metrics.get("ce_sae")
    if orig is not None and sae is not None:
        x0, x1 = sorted((sx(orig), sx(sae)))
        body.append(
            f'<rect x="{x0:.1f}" y="{axis_y - 10}" width="{max(1.0, x1 - x0):.1f}" height="10" fill="{PALETTE["primary"]}" '
            f'opacity="0.25"><title>ΔCE = {escape(fmt_tick(sae - orig))} nats</title></rect>'
        )
    rows: list[list[tuple[float, float]]] = [[] for _ in marks]  # occupied label extents per row
    for name, value, colour in sorted(known, key=lambda mark: mark[1]):
        x = sx(value)
        text = f"{name} {fmt_tick(value)}"
        extent = 6.5 * len(text) + 8
        right_side = x < width * 0.6
        span = (x, x + extent) if right_side else (x - extent, x)
        row = next(
            (n for n, taken in enumerate(rows) if all(span[1] < a or span[0] > b for a, b in taken)),
            len(rows) - 1,
        )
        rows[row].append(span)
        label_y = 14 + 13 * row
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{label_y + 3}" y2="{axis_y}" stroke="{colour}" stroke-width="2"/>'
            f'<circle cx="{x:.1f}" cy="{axis_y}" r="3.5" fill="{colour}"/>'
            f'<text x="{x + 4 if right_side else x - 4:.1f}" y="{label_y}" fill="{colour}" '
            f'text-anchor="{"start" if right_side else "end"}">{escape(text)}</text>'
        )
    body.append(
        f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle" fill="{PALETTE["axis"]}">nats per token</text>'
    )
    return _svg(width, height, title, body)


def _fraction(fraction: float) -> str:
    return f"{fraction:.3f}" if fraction >= 0.1 else fmt_tick(fraction)


def _curve_legend(law: ScalingLaw, label: str, c_orig: float, orig: float, c_sae: float | None) -> str:
    """One SAE's legend line under :func:`compute_curve`."""
    text = f"{label}: L_orig {fmt_tick(orig)}"
    if c_sae is not None:
        fraction = c_sae / c_orig
        text += f" → L_sae {fmt_tick(law.loss_at(c_sae))}: {_fraction(fraction)} of the training compute"
        if fraction > 1:
            text += " (above 1: the splice lowered the loss)"
    return text


#: ``(label, L_orig, L_sae)`` of one SAE for :func:`compute_curve` (nats/token; None where not measured).
CurveMark = tuple[str, float | None, float | None]


def compute_curve(
    law: ScalingLaw,
    marks: Sequence[CurveMark],
    *,
    title: str = "The model family's compute scaling law, with each SAE's loss on it",
    width: int = 640,
    height: int = 260,
) -> Markup:
    """The fitted law ``L(C) = E + A C^-gamma`` over log compute, its fit points, and each SAE's ``L_orig`` and
    ``L_sae`` placed on it: at the compute where the law reaches them (``law.compute_at``), so the horizontal
    gap between the two is ``compute_fraction`` (``C(L_sae) / C(L_orig)``). The curve is solid over the fit
    points' compute range and dashed where it extrapolates; E is a dashed horizontal line. A loss at or below E
    has no compute on the law and is listed under the chart as such.

    ``law``: a law with an amplitude A (a fit); ``marks``: :data:`CurveMark` per SAE; ``height``: of the plot
    and its axes, one 14-pixel legend line per SAE added below. Raises
    :class:`~pytest_saecheck.errors.ConfigError` for a law without A (as :meth:`ScalingLaw.loss_at`).
    """
    law.loss_at(1.0)  # a law without A raises here, naming the fix
    placed, unplaced = _place_marks(law, marks)
    xs = [c for c, _ in law.points] + [c for _, c, _, _ in placed] + [c for *_, c in placed if c is not None]
    if not xs:
        return _empty(width, height, title, "no fit points and no SAE loss to place on the law")
    log_low, log_high = math.floor(math.log10(min(xs)) - 0.25), math.ceil(math.log10(max(xs)) + 0.25)
    ys = [law.irreducible, law.loss_at(10**log_high)] + [loss for _, loss in law.points]
    ys += [loss for _, orig, sae in marks for loss in (orig, sae) if loss is not None and math.isfinite(loss)]
    y_ticks = nice_ticks(min(ys), max(ys), 5)
    y_low, y_high = y_ticks[0], y_ticks[-1]
    legend_h = 14 * (len(placed) + len(unplaced))  # one line per SAE under the plot: the chart grows with it
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    height += legend_h
    legend = [_curve_legend(law, label, c_orig, orig, c_sae) for label, c_orig, orig, c_sae in placed]
    longest = max((len(text) for text in [*legend, *unplaced]), default=0)
    width = max(width, math.ceil(_LEFT + 12 + CHAR_WIDTH * longest + _RIGHT))  # the legend is never clipped

    def sx(compute: float) -> float:
        return _LEFT + (math.log10(compute) - log_low) / (log_high - log_low) * plot_w

    def sy(loss: float) -> float:
        return _TOP + (1 - (loss - y_low) / (y_high - y_low)) * plot_h

    body = _y_grid(y_ticks, sy, plot_w, zero=False)
    for decade in range(log_low, log_high + 1):
        x = sx(10.0**decade)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" stroke="{PALETTE["grid"]}"/>'
            f'<text x="{x:.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle" fill="{PALETTE["axis"]}">1e{decade}</text>'
        )
    body.append(
        _axes(
            plot_w,
            plot_h,
            "training compute C (FLOPs, log scale)",
            _TOP + plot_h + 32,
            "loss (nats per token)",
        )
    )
    body += _law_shapes(law, (log_low, log_high), y_high, sx, sy, plot_w)
    legend_y = _TOP + plot_h + 48
    for index, (mark, text) in enumerate(zip(placed, legend, strict=True)):
        colour = SAE_COLOURS[index % len(SAE_COLOURS)]
        body += _mark_shapes(law, mark, colour, sx, sy)
        body.append(
            f'<circle cx="{_LEFT + 4}" cy="{legend_y + 14 * index - 4}" r="4" fill="{colour}"/>'
            f'<text x="{_LEFT + 12}" y="{legend_y + 14 * index}" fill="{PALETTE["text"]}">{escape(text)}</text>'
        )
    formula = f"L(C) = {fmt_tick(law.irreducible)} + {fmt_tick(dict(law.parameters)['A'])} C^-{law.gamma:.3g}"
    body.append(
        f'<text x="{_LEFT + plot_w}" y="14" text-anchor="end" fill="{PALETTE["axis"]}">{escape(formula)}</text>'
    )
    for index, text in enumerate(unplaced, start=len(placed)):
        body.append(
            f'<text x="{_LEFT + 12}" y="{legend_y + 14 * index}" fill="{PALETTE["axis"]}">{escape(text)}</text>'
        )
    return _svg(width, height, title, body)


#: One SAE placed on the law: ``(label, C_orig, L_orig, C_sae)``, ``C_sae`` None where L_sae is at or below E.
_Placed = tuple[str, float, float, float | None]


def _place_marks(law: ScalingLaw, marks: Sequence[CurveMark]) -> tuple[list[_Placed], list[str]]:
    """The SAEs placed on the law, and a line for each loss that has no compute on it (at or below E)."""
    placed: list[_Placed] = []
    unplaced: list[str] = []
    for label, orig, sae in marks:
        c_orig = None if orig is None else law.compute_at(orig)
        if c_orig is None or orig is None:
            unplaced.append(
                f"{label}: L_orig {'not measured' if orig is None else f'{fmt_tick(orig)} at or below E'}"
            )
            continue
        c_sae = None if sae is None else law.compute_at(sae)
        if sae is not None and c_sae is None:
            unplaced.append(
                f"{label}: L_sae {fmt_tick(sae)} at or below E, which no compute reaches: not drawn"
            )
        placed.append((label, c_orig, orig, c_sae))
    return placed, unplaced


def _law_shapes(
    law: ScalingLaw, decades: tuple[int, int], y_high: float, sx: _Scale, sy: _Scale, plot_w: float
) -> list[str]:
    """E as a dashed line; the law solid over its fit points' compute and dashed beyond; the fit points."""
    e_y = sy(law.irreducible)
    body = [
        f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{e_y:.1f}" y2="{e_y:.1f}" stroke="{PALETTE["zero"]}" '
        f'stroke-dasharray="4 3"/><text x="{_LEFT + plot_w - 4}" y="{e_y - 4:.1f}" text-anchor="end" '
        f'fill="{PALETTE["zero"]}">E = {escape(fmt_tick(law.irreducible))}</text>'
    ]
    fitted = [c for c, _ in law.points]
    span = (min(fitted), max(fitted)) if fitted else (math.inf, -math.inf)
    log_low, log_high = decades
    steps = 120
    solid: list[str] = []
    dashed: list[list[str]] = [[]]
    for i in range(steps + 1):
        compute = 10 ** (log_low + (log_high - log_low) * i / steps)
        loss = law.loss_at(compute)
        point = f"{sx(compute):.1f},{sy(loss):.1f}"
        if loss > y_high:  # above the plot: leave it out
            if dashed[-1]:
                dashed.append([])
        elif span[0] <= compute <= span[1]:
            solid.append(point)
            if dashed[-1]:
                dashed.append([])
        else:
            dashed[-1].append(point)
    for run in dashed:
        if len(run) > 1:
            body.append(
                f'<polyline fill="none" stroke="{PALETTE["primary"]}" stroke-width="1.5" stroke-dasharray="5 4" '
                f'points="{" ".join(run)}"/>'
            )
    if len(solid) > 1:
        body.append(
            f'<polyline fill="none" stroke="{PALETTE["primary"]}" stroke-width="2" points="{" ".join(solid)}"/>'
        )
    for compute, loss in law.points:
        body.append(
            f'<circle cx="{sx(compute):.1f}" cy="{sy(loss):.1f}" r="3.5" fill="white" stroke="{PALETTE["primary"]}" '
            f'stroke-width="1.5"><title>fit point: C {escape(fmt_tick(compute))} FLOPs, L {escape(fmt_tick(loss))}</title></circle>'
        )
    return body


def _mark_shapes(law: ScalingLaw, mark: _Placed, colour: str, sx: _Scale, sy: _Scale) -> list[str]:
    """One SAE's L_orig on the law and, where it has one, its L_sae joined to it by the compute gap."""
    label, c_orig, orig, c_sae = mark
    x0, y0 = sx(c_orig), sy(orig)
    body = [
        f'<circle cx="{x0:.1f}" cy="{y0:.1f}" r="4" fill="{PALETTE["text"]}"><title>{escape(label)}: L_orig '
        f"{escape(fmt_tick(orig))} at C {escape(fmt_tick(c_orig))}</title></circle>"
    ]
    if c_sae is not None:
        sae = law.loss_at(c_sae)
        x1, y1 = sx(c_sae), sy(sae)
        body.append(
            f'<line x1="{x0:.1f}" x2="{x1:.1f}" y1="{y1:.1f}" y2="{y1:.1f}" stroke="{colour}" '
            f'stroke-dasharray="2 2"/><circle cx="{x1:.1f}" cy="{y1:.1f}" r="4" fill="{colour}"><title>'
            f"{escape(label)}: L_sae {escape(fmt_tick(sae))} at C {escape(fmt_tick(c_sae))}: compute_fraction "
            f"{escape(_fraction(c_sae / c_orig))}</title></circle>"
        )
    return body
