"""Contact sheets: one PNG per prompt, a row per seed and a column per arm, for looking rather than reading.

They name the arms, so they are for researchers, never for raters (the rating app reads only the manifest).
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from fangzhi.files import replacing
from fangzhi.generate.config import BASE_ARM

CONTACT_SHEETS_DIR = "contact_sheets"
MIN_CELL = 256  # tiny test images are scaled up so the captions stay readable
MARGIN = 8
FONT_SIZE = 16


def _arm_order(arms: set[str]) -> list[str]:
    return sorted(arms, key=lambda arm: (arm != BASE_ARM, arm))


def write_contact_sheets(out: Path, records: list[dict]) -> list[Path]:
    """Write OUT/contact_sheets/<prompt_id>.png for every prompt in `records` (manifest records)."""
    font = ImageFont.load_default(size=FONT_SIZE)
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_prompt[record["prompt_id"]].append(record)
    folder = out / CONTACT_SHEETS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for prompt_id, prompt_records in by_prompt.items():
        arms = _arm_order({r["arm"] for r in prompt_records})
        seeds = sorted({r["seed"] for r in prompt_records})
        cell = {(r["arm"], r["seed"]): r for r in prompt_records}
        width = max(r["width"] for r in prompt_records)
        height = max(r["height"] for r in prompt_records)
        zoom = max(1, -(-MIN_CELL // width))
        cell_w, cell_h = width * zoom, height * zoom
        line_h = FONT_SIZE + 4
        sheet_w = MARGIN + len(arms) * (cell_w + MARGIN)
        # About 9 px per character at this font size; long prompts are cut after four lines.
        title_lines = textwrap.wrap(f"{prompt_id}: {prompt_records[0]['prompt_en']}", width=max(30, sheet_w // 9))[:4]
        header_h = MARGIN + line_h * (len(title_lines) + 1)
        sheet = Image.new("RGB", (sheet_w, header_h + len(seeds) * (cell_h + line_h + MARGIN)), "white")
        draw = ImageDraw.Draw(sheet)
        for index, line in enumerate(title_lines):
            draw.text((MARGIN, MARGIN + index * line_h), line, fill="black", font=font)
        for column, arm in enumerate(arms):
            x = MARGIN + column * (cell_w + MARGIN)
            scale = next((r["lora_scale"] for r in prompt_records if r["arm"] == arm), None)
            label = arm if scale is None or "@" in arm else f"{arm} (scale {scale:g})"
            draw.text((x, MARGIN + line_h * len(title_lines)), label, fill="black", font=font)
            for row, seed in enumerate(seeds):
                y = header_h + row * (cell_h + line_h + MARGIN)
                draw.text((x, y), f"seed {seed}", fill="black", font=font)
                record = cell.get((arm, seed))
                if record is None:
                    draw.text((x, y + line_h), "(not generated)", fill="grey", font=font)
                    continue
                with Image.open(out / record["file"]) as image:
                    tile = image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST)
                sheet.paste(tile, (x, y + line_h))
        path = folder / f"{prompt_id}.png"
        with replacing(path) as temporary:
            sheet.save(temporary, format="PNG")
        written.append(path)
    return written
