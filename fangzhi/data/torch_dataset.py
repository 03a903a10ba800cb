"""The torch Dataset that feeds (image, caption) pairs to LoRA training."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

from fangzhi.data.check import Entry, read_rgb


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Square training crops in [-1, 1] with captions that start with the trigger phrase.

    Each item is `{"pixel_values": float tensor [3, R, R] in [-1, 1], "caption": str, "index": int, "flip": bool}`
    where the caption is "TRIGGER, caption" (the trigger is added here, never written into caption files).
    With `pixels=False` the image is not read and `pixel_values` is left out (training from cached latents
    needs only the caption and which way the image faces).
    The image is converted to RGB, resized so its short side is `resolution` (Lanczos, which keeps
    fine brush lines when shrinking; a large JPEG is decoded at a reduced DCT scale first), then cropped to a square: centred, or at a random offset when
    `center_crop=False`; with `random_flip` it is mirrored left-right with probability 0.5.

    `caption_dropout` is the probability of replacing the whole caption, trigger included, with ""
    (as diffusers' training scripts do): the model also learns the unconditional case, which
    classifier-free guidance needs at generation time.

    Every random choice comes from `random.Random` seeded by (seed, epoch, index), so an item is the
    same whatever the worker count, and a run resumed at epoch E sees exactly the augmentations
    the original run saw. Call `set_epoch(epoch)` before each epoch, before the DataLoader starts
    its workers (i.e. not with `persistent_workers=True`, whose workers keep the old epoch).
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        resolution: int = 512,
        trigger: str = "shuntianfuzhi style",
        repeats: int = 1,
        caption_dropout: float = 0.0,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        pixels: bool = True,
    ) -> None:
        if not entries:
            raise ValueError("CaptionedImageDataset needs at least one entry")
        if resolution < 1 or repeats < 1 or not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"need resolution >= 1, repeats >= 1, 0 <= caption_dropout <= 1; got {resolution}, {repeats}, {caption_dropout}")
        self.entries = list(entries)
        self.resolution = resolution
        self.trigger = trigger.strip()
        self.repeats = repeats
        self.caption_dropout = caption_dropout
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.pixels = pixels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries) * self.repeats

    def caption_for(self, entry: Entry) -> str:
        """The text the text encoder sees for `entry` when the caption is not dropped."""
        return f"{self.trigger}, {entry.caption}" if self.trigger else entry.caption

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        entry = self.entries[index % len(self.entries)]
        # A string seed is hashed with SHA-512 by `random`, so it is stable across processes and Python runs.
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        drop_caption = rng.random() < self.caption_dropout
        flip = self.random_flip and rng.random() < 0.5
        item = {"caption": "" if drop_caption else self.caption_for(entry), "index": index, "flip": flip}
        if not self.pixels:
            return item

        image, _ = read_rgb(entry.path, min_side=self.resolution)
        width, height = image.size
        scale = self.resolution / min(width, height)
        new_size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        # reducing_gap: a box reduction first, while the image is more than twice the target: ~2.5x faster,
        # within 0.4 grey levels on average of a Lanczos pass over all the pixels.
        image = image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=2.0)

        spare_x, spare_y = new_size[0] - self.resolution, new_size[1] - self.resolution
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if flip:
            image = ImageOps.mirror(image)

        return {"pixel_values": pil_to_tensor(image).float() / 127.5 - 1.0, **item}
