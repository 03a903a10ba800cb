"""Plots (PNG), the JSON of every number, and one self-contained HTML report with the plots embedded as base64."""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fangzhi.dimensions import DIMENSION_KEYS, SCORE_MAX, SCORE_MIN
from fangzhi.evaluate.table import ROW_NAMES, SCORE_ROWS

# Fonts that cover Chinese, best first; the Debian package fonts-noto-cjk provides the first ones.
CJK_FONTS: tuple[str, ...] = (
    "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK JP", "Noto Serif CJK SC", "Source Han Sans SC", "Source Han Sans CN",
    "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC",
)
CJK_FONT_FILES = re.compile(r"cjk|wqy|wenquanyi|sourcehan|simhei|msyh|pingfang", re.IGNORECASE)
CJK_TEXT = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef]")


def find_cjk_font() -> str | None:
    """Name of an installed font that covers Chinese, or None.

    matplotlib's font cache is built once; fonts installed later (apt install fonts-noto-cjk) are
    added from the system font folders the first time they are needed.
    """
    from matplotlib import font_manager

    def known() -> str | None:
        names = {font.name for font in font_manager.fontManager.ttflist}
        return next((name for name in CJK_FONTS if name in names), None)

    name = known()
    if name is None:
        for path in font_manager.findSystemFonts():
            if CJK_FONT_FILES.search(Path(path).name):
                with contextlib.suppress(Exception):  # a broken font file must not stop the report
                    font_manager.fontManager.addfont(path)
        name = known()
    return name


@contextlib.contextmanager
def fonts_for(texts: list[str]):
    """Plot with a CJK-capable font when any label is Chinese; warn once (naming the package) when none is installed."""
    if not any(CJK_TEXT.search(str(text)) for text in texts):
        yield
        return
    name = find_cjk_font()
    if name is None:
        warnings.warn("plots: no Chinese-capable font is installed, so Chinese names show as empty boxes; install one (Debian/Ubuntu: apt install fonts-noto-cjk)", stacklevel=3)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # said once above, not once per glyph
            yield
        return
    with matplotlib.rc_context({"font.family": "sans-serif", "font.sans-serif": [name, *matplotlib.rcParams["font.sans-serif"]]}):
        yield


def titled(text: str, title_note: str | None) -> str:
    return f"{text} ({title_note})" if title_note else text


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_means(summary: pd.DataFrame, arms: list[str], unit_note: str, title_note: str | None) -> bytes:
    """Grouped bars: mean per score row and arm, error bars ± 1 SD over the table's units."""
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(arms)
    x = np.arange(len(SCORE_ROWS))
    for i, arm in enumerate(arms):
        part = summary[summary["arm"] == arm].set_index("score").loc[list(SCORE_ROWS)]
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, part["mean"], width, yerr=part["sd"].fillna(0), capsize=3, label=arm)
    ax.set_xticks(x, [ROW_NAMES[s] for s in SCORE_ROWS], rotation=15)
    ax.set_ylim(0, SCORE_MAX + 0.5)
    ax.set_ylabel(f"mean score (error bar: ± SD {unit_note.split(';')[0]})")
    ax.set_title(titled("Mean ± SD per dimension and arm", title_note))
    ax.legend()
    return _png(fig)


def plot_distributions(ratings: pd.DataFrame, arms: list[str], title_note: str | None) -> bytes:
    """Share of ratings at each score 1–5, per dimension and arm."""
    fig, axes = plt.subplots(1, len(DIMENSION_KEYS), figsize=(12, 3), sharey=True)
    levels = np.arange(SCORE_MIN, SCORE_MAX + 1)
    width = 0.8 / len(arms)
    for ax, dim in zip(axes, DIMENSION_KEYS):
        for i, arm in enumerate(arms):
            counts = np.bincount(ratings.loc[ratings["arm"] == arm, dim].to_numpy(), minlength=SCORE_MAX + 1)[SCORE_MIN:]
            ax.bar(levels + (i - (len(arms) - 1) / 2) * width, counts / max(counts.sum(), 1), width, label=arm)
        ax.set_title(ROW_NAMES[dim])
        ax.set_xticks(levels)
        ax.set_xlabel("score")
    axes[0].set_ylabel("share of ratings")
    axes[-1].legend()
    fig.suptitle(titled("Score distributions", title_note))
    return _png(fig)


def plot_rater_heatmap(per_rater: pd.DataFrame, arms: list[str], title_note: str | None) -> bytes:
    """Raters × (arm, score) mean scores; shows lenient/strict raters and who sees a difference."""
    wide = per_rater.pivot(index="rater", columns="arm", values=list(SCORE_ROWS))
    columns = [(score, arm) for arm in arms for score in SCORE_ROWS if (score, arm) in wide.columns]
    matrix = wide[columns].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2, 0.35 * len(wide) + 1.8))
    image = ax.imshow(matrix, cmap="viridis", vmin=SCORE_MIN, vmax=SCORE_MAX, aspect="auto")
    ax.set_xticks(range(len(columns)), [f"{arm}\n{score}" for score, arm in columns], fontsize=8)
    ax.set_yticks(range(len(wide)), wide.index, fontsize=8)
    if matrix.size <= 400:
        for (row, col), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(col, row, f"{value:.1f}", ha="center", va="center", fontsize=7, color="white" if value < 3.5 else "black")
    fig.colorbar(image, ax=ax, label="mean score")
    ax.set_title(titled("Mean score per rater", title_note))
    return _png(fig)


def plot_clip_scatter(joined: pd.DataFrame, clip_columns: list[str], title_note: str | None) -> bytes:
    """Image-level comprehensive human score against each CLIP number, coloured by arm."""
    fig, axes = plt.subplots(1, len(clip_columns), figsize=(5 * len(clip_columns), 4), squeeze=False)
    for ax, column in zip(axes[0], clip_columns):
        for arm, part in joined.groupby("arm", observed=True):
            ax.scatter(part[column], part["comprehensive"], s=10, alpha=0.6, label=arm)
        ax.set_xlabel(column)
        ax.set_ylabel("human comprehensive score (image mean)")
        ax.legend()
    fig.suptitle(titled("CLIP vs human scores", title_note))
    return _png(fig)


def to_jsonable(value: Any) -> Any:
    """DataFrames to lists of records; NaN/inf to null so the JSON is strict."""
    if isinstance(value, pd.DataFrame):
        return [to_jsonable(r) for r in value.to_dict(orient="records")]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(to_jsonable(data), indent=1, ensure_ascii=False, allow_nan=False), encoding="utf-8")


def _html_table(frame: pd.DataFrame, float_format: str = "{:.3g}") -> str:
    return frame.to_html(index=False, border=0, classes="data", na_rep="–", float_format=float_format.format, escape=True)


def write_html(
    path: Path,
    title: str,
    facts: list[str],
    table_markdown_title: str,
    paper_table: pd.DataFrame,
    table_note: str,
    sections: list[tuple[str, str, pd.DataFrame | None]],
    figures: dict[str, bytes],
) -> None:
    """One HTML file that needs nothing else: tables inline, figures as base64 PNG data URIs.

    `sections` are (heading, explanatory text, table or None) shown after Table 2.
    """
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table.data{border-collapse:collapse;font-size:13px;margin:.5em 0}"
        "table.data td,table.data th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        ".note{color:#444;font-size:13px}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in facts) + "</ul>",
        f"<h2>{html.escape(table_markdown_title)}</h2>",
        paper_table.reset_index().to_html(index=False, border=0, classes="data", escape=True),
        f"<p class='note'>{html.escape(table_note)}</p>",
    ]
    for heading, text, frame in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            parts.append(f"<p class='note'>{html.escape(text)}</p>")
        if frame is not None:
            parts.append(_html_table(frame))
    parts.append("<h2>Figures</h2>")
    for name, png in figures.items():
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{encoded}'><figcaption>{html.escape(name)}</figcaption></figure>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
