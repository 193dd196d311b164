"""A drift report for a person: one self-contained HTML page (inline SVG, no scripts, no CDN).

Built from the same summary `GET /v1/models/{name}/drift` returns: the alarm state, the latest
window's tests, reference-versus-window histograms of every score, and a timeline of which
tests drifted in the recent windows.
"""

from __future__ import annotations

import math
import time
from html import escape
from typing import Any

REFERENCE_COLOUR = "#4c78a8"
WINDOW_COLOUR = "#e45756"
TIMELINE_COLOURS = {"ok": "#54a24b", "drifting": "#f2a93b", "alarm": "#c0392b", "absent": "#ddd"}


def _number(value: object, digits: int = 4) -> str:
    if not isinstance(value, int | float) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        return "n/a"
    if isinstance(value, float) and value != 0 and abs(value) < 10 ** (-digits):
        return f"{value:.2e}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def histogram_svg(name: str, histogram: dict[str, list[float]], width: int = 420) -> str:
    """Reference (blue, filled) and window (red, outlined) shares per bin, on shared edges."""
    edges, reference, window = histogram["edges"], histogram["reference"], histogram["window"]
    height, pad = 160, 24
    top = max([*reference, *window, 1e-9])
    bar = (width - 2 * pad) / max(1, len(reference))

    def y(share: float) -> float:
        return height - pad - (height - 2 * pad) * share / top

    bars = []
    for i, (ref, win) in enumerate(zip(reference, window, strict=True)):
        x = pad + i * bar
        bars.append(
            f'<rect x="{x:.1f}" y="{y(ref):.1f}" width="{bar:.1f}" '
            f'height="{height - pad - y(ref):.1f}" fill="{REFERENCE_COLOUR}" opacity="0.55"/>'
        )
        bars.append(
            f'<rect x="{x:.1f}" y="{y(win):.1f}" width="{bar:.1f}" '
            f'height="{height - pad - y(win):.1f}" fill="none" stroke="{WINDOW_COLOUR}" '
            'stroke-width="1.5"/>'
        )
    label = escape(name)
    return (
        f'<figure><svg role="img" aria-label="{label}: reference versus window" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        + "".join(bars)
        + f'<text x="{pad}" y="{height - 6}" font-size="11">{_number(edges[0], 3)}</text>'
        f'<text x="{width - pad}" y="{height - 6}" font-size="11" text-anchor="end">'
        f"{_number(edges[-1], 3)}</text></svg>"
        f"<figcaption>{label}: <span style='color:{REFERENCE_COLOUR}'>reference</span> vs "
        f"<span style='color:{WINDOW_COLOUR}'>latest window</span> (share per bin)"
        "</figcaption></figure>"
    )


def _timeline(history: list[dict[str, Any]]) -> str:
    windows = list(reversed(history))  # oldest first
    tests = sorted({r["test"] for w in windows for r in w.get("results", [])})
    if not tests:
        return "<p>No window evaluated yet.</p>"
    header = "".join(f"<th scope='col'>{w.get('index')}</th>" for w in windows)
    rows = []
    for test in tests:
        cells = []
        for window in windows:
            result = next((r for r in window.get("results", []) if r["test"] == test), None)
            if result is None:
                state = "absent"
            elif window.get("alarms", {}).get(test):
                state = "alarm"
            else:
                state = "drifting" if result.get("drifting") else "ok"
            cells.append(
                f"<td title='{escape(state)}' style='background:{TIMELINE_COLOURS[state]}'>"
                f"<span class='sr'>{escape(state)}</span></td>"
            )
        rows.append(f"<tr><th scope='row'>{escape(test)}</th>{''.join(cells)}</tr>")
    return (
        "<table class='timeline'><thead><tr><th>test \\ window</th>"
        + header
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _results_table(latest: dict[str, Any]) -> str:
    rows = []
    alarms = latest.get("alarms", {})
    for result in latest.get("results", []):
        test = result["test"]
        rows.append(
            "<tr>"
            f"<th scope='row'>{escape(test)}</th>"
            f"<td>{_number(result.get('statistic'))}</td>"
            f"<td>{_number(result.get('p_value'))}</td>"
            f"<td>{_number(result.get('effect_size'))} "
            f"({escape(str(result.get('effect_name', '')))})</td>"
            f"<td>{'yes' if result.get('drifting') else 'no'}</td>"
            f"<td>{'ALARM' if alarms.get(test) else 'no'}</td>"
            "</tr>"
        )
    return (
        "<table><thead><tr><th>test</th><th>statistic</th><th>p-value</th><th>effect size</th>"
        "<th>drifting</th><th>alarm</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def render_html(summary: dict[str, Any], generated_at: float | None = None) -> str:
    model, version = escape(str(summary["model"])), escape(str(summary["version"]))
    latest = summary.get("latest")
    when = time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() if generated_at is None else generated_at)
    )
    streaming = ", ".join(
        f"{escape(score)}: {'ALARM' if value['alarm'] else 'quiet'} "
        f"({value['detections']} detections)"
        for score, value in summary.get("streaming", {}).items()
    )
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Drift report: {model} v{version}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:70rem}"
        "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;"
        "padding:.25rem .5rem;text-align:right}th[scope=row]{text-align:left}"
        ".timeline td{width:1rem;height:1rem;padding:0}.sr{position:absolute;left:-9999px}"
        "figure{display:inline-block;margin:0 1rem 1rem 0}.alarm{color:#c0392b}</style>",
        "</head><body>",
        f"<h1>Drift report: {model} version {version}</h1>",
        f"<p>Generated {when}. Windows evaluated: {summary.get('windows_evaluated', 0)}; "
        f"events evaluated: {summary.get('events_evaluated', 0)}; waiting for the next "
        f"window: {summary.get('buffered_events', 0)}; late: {summary.get('late_events', 0)}.</p>",
    ]
    if not summary.get("has_reference", True):
        parts.append("<p>This model version has no reference profile: nothing is tested.</p>")
    if latest is None:
        parts.append("<p>No window has been evaluated yet.</p>")
    else:
        state = "<strong class='alarm'>ALARM</strong>" if latest.get("alarm") else "no alarm"
        parts += [
            f"<h2>Latest window #{latest.get('index')}, {latest.get('size')} events: {state}</h2>",
            f"<p>Streaming alarms (Page-Hinkley): {streaming or 'none'}.</p>",
            _results_table(latest),
            "<h2>Reference versus latest window</h2>",
            *(histogram_svg(n, h) for n, h in sorted(latest.get("histograms", {}).items())),
        ]
    parts += [
        "<h2>Recent windows</h2>",
        "<p>Green: no drift; orange: drifting in that window; red: in alarm (drifting in "
        "consecutive windows); grey: test not run.</p>",
        _timeline(summary.get("history", [])),
        "</body></html>",
    ]
    return "\n".join(parts)
