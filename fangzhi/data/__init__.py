"""Training data: check a folder of captioned paintings, pick a subset, and feed it to training.

Public API:

* `check_dataset(folder, resolution=512, allow_upscale=False) -> DatasetReport` — every problem, per file.
* `select_subset(src, n, out, seed=0) -> list[Path]` — reproducible random subset copied to a new folder.
* `DataConfig`, `load_training_entries(cfg) -> list[Entry]` — the checked examples training starts from.
* `CaptionedImageDataset` — the torch Dataset (imported on first use, so `fangzhi dataset check` does not load torch).
* `DEMO_DATASET` — the bundled 8-painting demo folder.
"""

from fangzhi.data.check import IMAGE_EXTENSIONS, DatasetReport, Entry, Problem, check_dataset, read_rgb
from fangzhi.data.loading import DEMO_DATASET, DataConfig, load_training_entries
from fangzhi.data.select import select_subset

__all__ = [
    "DEMO_DATASET",
    "IMAGE_EXTENSIONS",
    "CaptionedImageDataset",
    "DataConfig",
    "DatasetReport",
    "Entry",
    "Problem",
    "check_dataset",
    "load_training_entries",
    "read_rgb",
    "select_subset",
]


def __getattr__(name: str):
    if name == "CaptionedImageDataset":
        from fangzhi.data.torch_dataset import CaptionedImageDataset

        return CaptionedImageDataset
    raise AttributeError(f"module 'fangzhi.data' has no attribute {name!r}")
