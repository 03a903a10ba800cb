"""What the rating app reads and writes for a pairwise (side-by-side) study.

The same rules as `store` for absolute studies: the app's one connection (a `store.StudyServer`
cursor, or a study path for tools and tests), one transaction per save holding the four choices
(an upsert, so saving the same answers again changes nothing but the save count), audit rows of
what changed, and the comparison's comment and time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.errors import FangzhiError
from fangzhi.rating_app.store import AnswerTables, Database, _query_df, _using, completed_positions, save_answers
from fangzhi.studydb.schema import BLANK_SIDE

CHOICES: tuple[str, ...] = ("left", "right", "tie")
CHOICE_TABLES = AnswerTables("comparisons", "choices", "choice", "choice_audit", "comparison_notes", "comparison")


@dataclass(frozen=True)
class ComparisonView:
    """One comparison as the page needs it. Paths stay on the server (None: the blank image); only pixels leave."""

    position: int
    left_path: str | None
    right_path: str | None
    narrative_zh: str
    prompt_en: str
    choices: dict[str, str]
    comment: str


def comparison_view(db: Database, rater_id: int, position: int) -> ComparisonView:
    with _using(db) as con:
        row = con.execute(
            """
            SELECT li.path, ri.path, p.narrative_zh, p.prompt_en, coalesce(n.comment, '')
            FROM comparisons c
            JOIN prompts p USING (prompt_id)
            LEFT JOIN images li ON li.image_id = c.left_image
            LEFT JOIN images ri ON ri.image_id = c.right_image
            LEFT JOIN comparison_notes n USING (rater_id, position)
            WHERE c.rater_id = ? AND c.position = ?
            """,
            [rater_id, position],
        ).fetchone()
        if row is None:
            raise FangzhiError(f"rater {rater_id} has no comparison at position {position}")
        choices = dict(con.execute("SELECT dimension, choice FROM choices WHERE rater_id = ? AND position = ?", [rater_id, position]).fetchall())
    left, right, narrative_zh, prompt_en, comment = row
    return ComparisonView(position, left, right, narrative_zh, prompt_en, choices, comment)


def completed_comparisons(db: Database, rater_id: int) -> list[bool]:
    """For each of the rater's comparisons in order: are all four dimensions answered?"""
    return completed_positions(db, rater_id, CHOICE_TABLES)


def save_choices(db: Database, rater_id: int, position: int, choices: Mapping[str, str], comment: str = "", seconds: float = 0.0) -> None:
    """Save one comparison's four choices, comment and time in one transaction; changes go to choice_audit."""
    if set(choices) != set(DIMENSION_KEYS):
        raise FangzhiError(f"a save needs exactly the choices {list(DIMENSION_KEYS)}, got {sorted(choices)}")
    for dimension, choice in choices.items():
        if choice not in CHOICES:
            raise FangzhiError(f"choice for {dimension!r} must be one of {', '.join(CHOICES)}, got {choice!r}")

    save_answers(db, CHOICE_TABLES, rater_id, position, choices, comment, seconds)


def list_comparisons(db: Database) -> pd.DataFrame:
    """Every rater's comparisons with the arms on each side (unblinded!): for simulated raters and tests."""
    return _query_df(
        db,
        f"""
        SELECT r.name AS rater, c.position, c.prompt_id AS prompt, c.seed, c.kind,
               coalesce(li.arm, '{BLANK_SIDE}') AS left_arm, coalesce(ri.arm, '{BLANK_SIDE}') AS right_arm
        FROM comparisons c JOIN raters r USING (rater_id)
        LEFT JOIN images li ON li.image_id = c.left_image LEFT JOIN images ri ON ri.image_id = c.right_image
        ORDER BY r.rater_id, c.position
        """,
    )


def add_votes(db: Database, rows: Iterable[Mapping[str, Any]]) -> int:
    """Save comparisons given as dicts {rater, position, style, match, detail, beauty[, comment, seconds]} (choices
    as left/right/tie) through `save_choices`, the app's own save path. Returns the number saved."""
    with _using(db) as con:
        rater_ids = dict(con.execute("SELECT name, rater_id FROM raters").fetchall())
        saved = 0
        for row in rows:
            if row["rater"] not in rater_ids:
                raise FangzhiError(f"no rater named {row['rater']!r} in this study")
            choices = {key: row[key] for key in DIMENSION_KEYS}
            save_choices(con, rater_ids[row["rater"]], int(row["position"]), choices, row.get("comment", ""), row.get("seconds", 0.0))
            saved += 1
    return saved


def arm_summary(votes: pd.DataFrame) -> pd.DataFrame:
    """Per dimension and arm, over the main comparisons: shown, wins, ties, losses and the win rate with ties
    as half a win (unblinded: admin only, after unblinding; the analysis adds CIs and Bradley–Terry)."""
    main = votes[votes["kind"] == "main"]
    sides = [
        pd.DataFrame({"dimension": main["dimension"], "arm": main[side], "won": main["choice"] == side, "tie": main["choice"] == "tie"})
        for side in ("left", "right")
    ]
    summary = pd.concat(sides).groupby(["dimension", "arm"], sort=False).agg(comparisons=("won", "size"), wins=("won", "sum"), ties=("tie", "sum"))
    summary["losses"] = summary["comparisons"] - summary["wins"] - summary["ties"]
    summary["win_rate"] = (summary["wins"] + summary["ties"] / 2) / summary["comparisons"]
    order = {key: index for index, key in enumerate(DIMENSION_KEYS)}
    return summary.reset_index().sort_values(["dimension", "arm"], key=lambda c: c.map(order) if c.name == "dimension" else c).reset_index(drop=True)
