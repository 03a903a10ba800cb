"""The training data settings, and the checked list of examples training starts from."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from fangzhi.config import StrictModel
from fangzhi.data.check import Entry, check_dataset
from fangzhi.errors import FangzhiError

DEMO_DATASET: Path = Path(__file__).resolve().parent / "demo"
"""Eight 282 px landscape paintings with captions, shipped with the package (train them at 256 or below)."""

_MAX_LISTED_ERRORS = 30


class DataConfig(StrictModel):
    """The `data:` section of a training config."""

    path: str = Field(default=str(DEMO_DATASET), description="dataset folder: images with name.txt captions and/or metadata.jsonl; the default is the bundled 8-image demo (282 px, so use resolution 256 or less with it)")
    resolution: int = Field(default=512, gt=0, description="training images are resized (short side) and cropped to this many pixels square; images smaller than this are errors unless allow_upscale")
    trigger: str = Field(default="shuntianfuzhi style", description="phrase put before every caption as 'TRIGGER, caption' at training time (never written into caption files); empty for none")
    repeats: int = Field(default=1, ge=1, description="how many times each image appears per epoch")
    caption_dropout: float = Field(default=0.0, ge=0.0, le=1.0, description="probability that a whole caption (trigger included) is replaced by an empty string, teaching the unconditional case used by guidance")
    center_crop: bool = Field(default=True, description="crop the centre square; false crops at a random (seeded) offset")
    random_flip: bool = Field(default=True, description="mirror images left-right with probability 0.5 (seeded by seed, epoch and index)")
    skip_bad_files: bool = Field(default=False, description="train on the good images and list the skipped ones, instead of stopping when the dataset check finds errors")
    allow_upscale: bool = Field(default=False, description="accept images smaller than resolution (they are upscaled, which blurs them) instead of treating them as errors")


def load_training_entries(cfg: DataConfig) -> list[Entry]:
    """Check the dataset in `cfg.path` and return its usable (image, caption) entries.

    The check runs before training so that no bad file can stop a run mid-epoch. With errors,
    raises FangzhiError listing them, unless `cfg.skip_bad_files`, which prints the skipped
    files and keeps the rest. Raises FangzhiError when nothing usable is left.
    """
    report = check_dataset(cfg.path, resolution=cfg.resolution, allow_upscale=cfg.allow_upscale)
    errors = report.errors
    if errors and not cfg.skip_bad_files:
        listed = [f"  {problem}" for problem in errors[:_MAX_LISTED_ERRORS]]
        if len(errors) > _MAX_LISTED_ERRORS:
            listed.append(f"  ... and {len(errors) - _MAX_LISTED_ERRORS} more (run `fangzhi dataset check {cfg.path} --resolution {cfg.resolution}` for all)")
        # Skipping bad files helps only where good ones are left.
        skipping = f", or set data.skip_bad_files to train on the {len(report.entries)} good images" if report.entries else ""
        raise FangzhiError(f"{cfg.path}: the dataset check found {len(errors)} error(s); fix them{skipping}:\n" + "\n".join(listed))
    if errors:
        print(f"skip_bad_files: {len(report.entries)} of {report.image_count} images kept; skipped because of these {len(errors)} errors:")
        for problem in errors:
            print(f"  {problem}")
    if not report.entries:
        raise FangzhiError(f"{cfg.path}: no usable images at resolution {cfg.resolution}; run `fangzhi dataset check {cfg.path} --resolution {cfg.resolution}`")
    return report.entries
