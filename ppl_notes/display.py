"""Rich display in notebooks: the HTML a ``Posterior``, a ``Verdict`` and a ``Calibration`` show.

Jupyter calls an object's ``_repr_html_`` and shows the page fragment it returns, as it
does for ArviZ's ``DataTree`` and pandas' tables; a plain ``repr`` stays one short line.
Every name and message is escaped (a story's site may be called anything), the style
sits in the fragment itself (no stylesheet is fetched), and a fragment that cannot be
made falls back to the escaped plain text: a display never raises.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import pandas as pd

__all__ = ["posterior_html", "verdict_html", "calibration_html"]

_STYLE = (
    "<style>.ppl-notes{font-family:system-ui,sans-serif;font-size:.9em;}"
    ".ppl-notes table{border-collapse:collapse;margin:.4em 0;}"
    ".ppl-notes th,.ppl-notes td{border:1px solid #ddd;padding:.2em .5em;text-align:right;}"
    ".ppl-notes th{background:#f4f4f4;}"
    ".ppl-notes td:first-child,.ppl-notes th:first-child{text-align:left;}"
    ".ppl-notes .bad{background:#fff4e5;border-left:4px solid #e69500;padding:.3em .6em;"
    "margin:.2em 0;}"
    ".ppl-notes .good{background:#eaf7ea;border-left:4px solid #2e8b57;padding:.3em .6em;"
    "margin:.2em 0;}</style>")


def _fragment(title: str, body: list[str]) -> str:
    return (f"{_STYLE}<div class='ppl-notes'><b>{html.escape(title)}</b>"
            + "".join(body) + "</div>")


def _table(frame: pd.DataFrame) -> str:
    """A DataFrame as an HTML table, every cell escaped."""
    return frame.to_html(escape=True, border=0, float_format=lambda v: f"{v:.4g}")


def _safe(render: Callable[[Any], str], shown: Any) -> str:
    """``render(shown)``, or the escaped plain ``repr`` where rendering fails."""
    try:
        return render(shown)
    except Exception as error:  # noqa: BLE001 - a display never raises
        return (f"<pre>{html.escape(repr(shown))}</pre><p><i>(no rich display: "
                f"{html.escape(type(error).__name__)}: {html.escape(str(error))})</i></p>")


def verdict_html(verdict) -> str:
    """The verdict: reliable or not, what fails (with what to do) and what holds."""

    def render(verdict) -> str:
        body = [f"<div class='{'good' if verdict.reliable else 'bad'}'>"
                f"{'reliable' if verdict.reliable else 'NOT reliable'}</div>"]
        for title, reasons, kind in (("fails", verdict.fails, "bad"),
                                     ("holds", verdict.holds, "good")):
            if reasons:
                body.append(f"<p>{title}:</p>")
                body += [f"<div class='{kind}'>{html.escape(r)}</div>" for r in reasons]
        return _fragment("Verdict", body)

    return _safe(render, verdict)


def posterior_html(posterior) -> str:
    """The posterior: what made it, its summary table, and the verdict on it."""

    def render(posterior) -> str:
        attrs = posterior.tree.attrs
        sizes = dict(posterior.tree["posterior"].sizes)
        facts = [f"story {attrs.get('model', '')!r}", f"by {posterior.method}"]
        if attrs.get("guide"):
            facts.append(f"guide {attrs['guide']}")
        facts.append(", ".join(f"{k} {v}" for k, v in sizes.items()))
        seconds = float(attrs.get("seconds", float("nan")))
        if seconds == seconds:
            facts.append(f"{seconds:.2f} s")
        if posterior.partial:
            facts.append("partial (interrupted)")
        body = [f"<p>{html.escape('; '.join(facts))}</p>", _table(posterior.summary())]
        if posterior.num_draws >= 2:
            verdict = posterior.check()
            body.append(verdict_html(verdict).removeprefix(_STYLE))
        return _fragment("Posterior", body)

    return _safe(render, posterior)


def calibration_html(calibration) -> str:
    """The calibration: its verdict and rule, and each parameter's p-value against it."""

    def render(calibration) -> str:
        threshold = 0.05 / max(len(calibration.pvalues), 1)
        table = pd.DataFrame({"KS p-value": calibration.pvalues,
                              "below the threshold": calibration.pvalues < threshold})
        if calibration.vsbc_pvalues is not None and len(calibration.vsbc_pvalues):
            table["VSBC symmetry p-value"] = calibration.vsbc_pvalues
        replicates = calibration.ranks.sizes["replicate"]
        status = "calibrated" if calibration.calibrated else "NOT calibrated"
        partial = " (partial: interrupted)" if calibration.partial else ""
        body = [f"<div class='{'good' if calibration.calibrated else 'bad'}'>"
                f"{html.escape(status)}{partial}</div>",
                f"<p>{html.escape(calibration.story)!s} by {html.escape(calibration.method)}, "
                f"{replicates} replicates; {html.escape(calibration.rule)}</p>", _table(table)]
        return _fragment("Calibration", body)

    return _safe(render, calibration)
