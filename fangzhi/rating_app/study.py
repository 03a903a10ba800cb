"""Create a blind rating study from a generation manifest: items, raters with secret links, per-rater order.

A study holds every arm of the manifest (base and any number of LoRA arms): each (prompt, seed) must
have one image in every arm. Each rater gets their own randomized order (seeded per rater) in which
no two images of one (prompt, seed), whatever their arms, and no image and its repeat, are back to
back; a few images come again later for test–retest, and a few attention-check pages ask for a given score.
"""

from __future__ import annotations

import csv
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np

from fangzhi import studydb
from fangzhi.config import read_utf8_text
from fangzhi.errors import FangzhiError
from fangzhi.generate.manifest import read_manifest as read_generation_manifest
from fangzhi.rating_app import store
from fangzhi.rating_app.i18n import LANGUAGES
from fangzhi.rating_app.pairwise_design import PlannedComparison, plan_comparisons
from fangzhi.studydb.schema import MODES

REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_BASE_URL = "http://localhost:8501"


@dataclass(frozen=True)
class ManifestImage:
    image_id: str
    arm: str
    prompt_id: str
    seed: int
    path: Path
    prompt_en: str
    narrative_zh: str

    @property
    def pair_key(self) -> tuple[str, int]:
        """The (prompt, seed) unit: its images in the different arms are compared with each other."""
        return (self.prompt_id, self.seed)


@dataclass(frozen=True)
class PlannedItem:
    image_id: str
    kind: str  # 'main', 'retest' or 'attention'
    expected: int | None
    pair_key: tuple[str, int]


def read_manifest(manifest: str | Path) -> list[ManifestImage]:
    """The generation manifest's images (files checked against their sha256); problems name the line."""
    manifest = Path(manifest)
    images = [
        ManifestImage(
            r["image_id"], str(r["arm"]), str(r["prompt_id"]), r["seed"], (manifest.parent / r["file"]).resolve(),
            r["prompt_en"], r["narrative_zh"],
        )
        for r in read_generation_manifest(manifest, check_files=True)
    ]
    if not images:
        raise FangzhiError(f"{manifest}: no images listed")
    _check_texts_agree_across_arms(manifest, images)
    _check_every_unit_has_every_arm(manifest, images)
    return images


def _check_every_unit_has_every_arm(manifest: Path, images: list[ManifestImage]) -> None:
    # A (prompt, seed) missing an arm cannot be compared in that arm; an unfinished generation run is the usual cause.
    arms = sorted({image.arm for image in images})
    arms_of: dict[tuple[str, int], set[str]] = {}
    for image in images:
        arms_of.setdefault(image.pair_key, set()).add(image.arm)
    incomplete = [(key, [arm for arm in arms if arm not in present]) for key, present in arms_of.items() if len(present) < len(arms)]
    if incomplete:
        listed = "; ".join(f"prompt {p!r} seed {s}: no {', '.join(missing)}" for (p, s), missing in incomplete[:5])
        more = f" (and {len(incomplete) - 5} more)" if len(incomplete) > 5 else ""
        raise FangzhiError(
            f"{manifest}: every (prompt, seed) needs one image in each arm ({', '.join(arms)}); {listed}{more}. "
            "Finish the generation run (rerun `fangzhi generate` with the same --out) or remove the incomplete lines."
        )


def _check_texts_agree_across_arms(manifest: Path, images) -> None:
    # Raters see prompt_en and narrative_zh; if the arms of one prompt had different texts
    # (a trigger phrase, say), the text alone would reveal the arm.
    texts: dict[str, tuple[str, str]] = {}
    for image in images:
        seen = texts.setdefault(image.prompt_id, (image.prompt_en, image.narrative_zh))
        if seen != (image.prompt_en, image.narrative_zh):
            raise FangzhiError(
                f"{manifest}: prompt_id {image.prompt_id!r} has different prompt_en/narrative_zh in different lines; "
                "raters would see which arm an image is from. Use the prompt set's text, without trigger phrases."
            )


def read_rater_names(raters: str | Path | list[str]) -> list[str]:
    if isinstance(raters, (str, Path)):
        path = Path(raters)
        text = read_utf8_text(path, "rater names")
        names = [line.strip() for line in text.splitlines() if line.strip()]
        source = str(path)
    else:
        names = [name.strip() for name in raters]
        source = "rater names"
    if not names:
        raise FangzhiError(f"{source}: no rater names given")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise FangzhiError(f"{source}: rater name(s) listed twice: {', '.join(duplicates)}")
    return names


def plan_items(images: list[ManifestImage], qc_retest: int, qc_attention: int, rng: np.random.Generator) -> list[PlannedItem]:
    """One rater's item order: every image once, plus QC items, never two of one (prompt, seed) back to back."""
    if qc_retest > len(images):
        raise FangzhiError(f"qc_retest={qc_retest} is more than the {len(images)} images in the manifest")
    items = [PlannedItem(image.image_id, "main", None, image.pair_key) for image in images]
    for index in rng.choice(len(images), size=qc_retest, replace=False):
        items.append(PlannedItem(images[index].image_id, "retest", None, images[index].pair_key))
    for _ in range(qc_attention):
        image = images[rng.integers(len(images))]
        items.append(PlannedItem(image.image_id, "attention", int(rng.integers(1, 6)), image.pair_key))

    return order_apart(items, rng, lambda item: item.image_id)


def order_apart(items: list, rng: np.random.Generator, identity) -> list:
    """A random order of `items` (each with `.pair_key` and `.kind`) with no two of one (prompt, seed) back to back
    and every 'retest' item after the 'main' item of the same `identity`.

    Built by a random greedy walk (pick any remaining item whose pair differs from the previous
    one, and a repeat only after its first showing); a dead end restarts the walk.
    """
    for _attempt in range(500):
        remaining = list(items)
        order: list = []
        shown: set = set()
        while remaining:
            previous_pair = order[-1].pair_key if order else None
            candidates = [
                i for i, item in enumerate(remaining)
                if item.pair_key != previous_pair and (item.kind != "retest" or identity(item) in shown)
            ]
            if not candidates:
                break
            item = remaining.pop(candidates[rng.integers(len(candidates))])
            order.append(item)
            if item.kind == "main":
                shown.add(identity(item))
        if not remaining:
            return order
    raise FangzhiError(
        f"cannot order {len(items)} items so that no two images of one (prompt, seed) are back to back: "
        "the manifest needs more prompts or seeds (or fewer QC items)"
    )


def plan_pairwise(images: list[ManifestImage], qc_retest: int, qc_attention: int, rng: np.random.Generator) -> list[PlannedComparison]:
    """One rater's comparisons of a pairwise study in order (see `pairwise_design`)."""
    units: dict[tuple[str, int], dict[str, str]] = {}
    for image in images:
        units.setdefault(image.pair_key, {})[image.arm] = image.image_id
    return order_apart(plan_comparisons(units, qc_retest, qc_attention, rng), rng, lambda c: c.identity)


def _rater_seed(study_seed: int, rater_index: int) -> int:
    return int(np.random.SeedSequence([study_seed, rater_index]).generate_state(1)[0])


def _insert_rater(
    con: duckdb.DuckDBPyConnection, name: str, study_seed: int, images: list[ManifestImage], qc_retest: int, qc_attention: int, mode: str
) -> str:
    token = secrets.token_urlsafe(24)
    rater_index = con.execute("SELECT count(*) FROM raters").fetchone()[0]
    seed = _rater_seed(study_seed, rater_index)
    rater_id = con.execute(
        "INSERT INTO raters (name, token_sha256, seed) VALUES (?, ?, ?) RETURNING rater_id", [name, store.hash_token(token), seed]
    ).fetchone()[0]
    if mode == "pairwise":
        comparisons = plan_pairwise(images, qc_retest, qc_attention, np.random.default_rng(seed))
        con.executemany(
            "INSERT INTO comparisons VALUES (?, ?, ?, ?, ?, ?, ?)",
            [[rater_id, position, c.prompt_id, c.seed, c.left, c.right, c.kind] for position, c in enumerate(comparisons)],
        )
        return token
    order = plan_items(images, qc_retest, qc_attention, np.random.default_rng(seed))
    con.executemany(
        "INSERT INTO assignments VALUES (?, ?, ?, ?, ?)",
        [[rater_id, position, item.image_id, item.kind, item.expected] for position, item in enumerate(order)],
    )
    return token


def invitation_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/?token={token}"


def create_study(
    manifest: str | Path,
    db: str | Path,
    raters: str | Path | list[str],
    reference_images: str | Path | None = None,
    lang: str = "zh",
    qc_retest: int = 3,
    qc_attention: int = 2,
    seed: int = 0,
    base_url: str = DEFAULT_BASE_URL,
    mode: str = "absolute",
    links_out: str | Path | None = None,
) -> list[tuple[str, str, str]]:
    """Create the study database `db`; returns (rater name, token, invitation link) per rater, also written to
    `links_out` when given (a new file: an existing one may be another study's only copy of its links).

    `mode` 'absolute': each image scored 1–5; 'pairwise': side-by-side comparisons (`pairwise_design`).

    Only sha256 hashes of the tokens are stored: the returned links are the one chance to keep them.
    """
    db = Path(db)
    if db.exists():
        raise FangzhiError(f"{db}: already exists; choose a new file (an existing study and its ratings are never overwritten)")
    if links_out is not None and Path(links_out).exists():
        raise FangzhiError(
            f"{links_out}: already exists (another study's invitation links, which its database cannot give again); "
            "move it away or choose another --links-out"
        )
    if lang not in LANGUAGES:
        raise FangzhiError(f"--lang {lang!r}: choose one of {', '.join(LANGUAGES)}")
    if mode not in MODES:
        raise FangzhiError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if qc_retest < 0 or qc_attention < 0:
        raise FangzhiError("qc_retest and qc_attention must be 0 or more")
    images = read_manifest(manifest)
    names = read_rater_names(raters)
    references = _reference_paths(reference_images)
    # Fail on an impossible order before anything is written.
    (plan_pairwise if mode == "pairwise" else plan_items)(images, qc_retest, qc_attention, np.random.default_rng(seed))

    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(db.name + ".tmp")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp), config=studydb.DUCKDB_CONFIG)
    try:
        studydb.create_schema(con, mode)
        con.execute(
            "INSERT INTO study (study_key, manifest, default_lang, seed, qc_retest, qc_attention) VALUES (1, ?, ?, ?, ?, ?)",
            [str(Path(manifest).resolve()), lang, seed, qc_retest, qc_attention],
        )
        prompts = {image.prompt_id: (image.prompt_en, image.narrative_zh) for image in images}
        con.executemany("INSERT INTO prompts VALUES (?, ?, ?)", [[pid, en, zh] for pid, (en, zh) in prompts.items()])
        con.executemany(
            "INSERT INTO images VALUES (?, ?, ?, ?, ?)",
            [[i.image_id, i.arm, i.prompt_id, i.seed, str(i.path)] for i in images],
        )
        if references:
            con.executemany("INSERT INTO reference_images VALUES (?, ?)", [[n, str(p)] for n, p in enumerate(references)])
        tokens = [_insert_rater(con, name, seed, images, qc_retest, qc_attention, mode) for name in names]
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise
    con.close()
    links = [(name, token, invitation_link(base_url, token)) for name, token in zip(names, tokens)]
    if links_out is not None:
        try:
            write_links(links, links_out)
        except BaseException:  # a study without its links could never be rated
            tmp.unlink(missing_ok=True)
            raise
    # The study appears under its real name only when complete.
    tmp.rename(db)
    return links


def add_rater(db: store.Database, name: str, base_url: str = DEFAULT_BASE_URL) -> tuple[str, str, str]:
    """Invite one more rater to an existing study (while the app serves, through the app's connection)."""
    name = name.strip()
    if not name:
        raise FangzhiError("a rater needs a non-empty name")

    def insert(con: duckdb.DuckDBPyConnection) -> str:
        study_seed, qc_retest, qc_attention, mode = con.execute("SELECT seed, qc_retest, qc_attention, mode FROM study, study_mode").fetchone()
        if con.execute("SELECT 1 FROM raters WHERE name = ?", [name]).fetchone():
            raise FangzhiError(f"a rater named {name!r} already exists")
        image_rows = con.execute(
            "SELECT i.image_id, i.arm, i.prompt_id, i.seed, i.path, p.prompt_en, p.narrative_zh FROM images i JOIN prompts p USING (prompt_id) ORDER BY i.image_id"
        ).fetchall()
        images = [ManifestImage(r[0], r[1], r[2], r[3], Path(r[4]), r[5], r[6]) for r in image_rows]
        return _insert_rater(con, name, study_seed, images, qc_retest, qc_attention, mode)

    token = store._transaction(db, insert)
    return name, token, invitation_link(base_url, token)


def _reference_paths(reference_images: str | Path | None) -> list[Path]:
    if reference_images is None:
        return []
    folder = Path(reference_images)
    if not folder.is_dir():
        raise FangzhiError(f"--reference-images {folder}: not a folder")
    paths = sorted(p.resolve() for p in folder.iterdir() if p.suffix.lower() in REFERENCE_SUFFIXES)
    if not paths:
        raise FangzhiError(f"--reference-images {folder}: no .png/.jpg/.jpeg/.webp files in it")
    return paths


def links_file(db: str | Path, links_out: str | Path | None = None) -> Path:
    """Where a study's invitation links are kept: `links_out`, else beside the database as DB.links.csv."""
    return Path(links_out) if links_out else Path(db).with_suffix(".links.csv")


def write_links(links: list[tuple[str, str, str]], out: str | Path) -> None:
    """The admin's copy of the invitation links (the database only keeps token hashes): a new file, readable by its owner
    alone from the start, never one written over."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FangzhiError(f"{out}: already exists; invitation links are never written over") from None
    try:
        with open(descriptor, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["rater", "token", "link"])
            writer.writerows(links)
    except BaseException:  # e.g. a full disk: no half list left behind to be taken for the study's links
        out.unlink(missing_ok=True)
        raise


def append_links(links: list[tuple[str, str, str]], out: str | Path) -> None:
    """Add invitation links to the admin's links file (created, with its header, if missing; kept mode 600)."""
    out = Path(out)
    if not out.exists():
        write_links(links, out)
        return
    out.chmod(0o600)
    with out.open("a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(links)
