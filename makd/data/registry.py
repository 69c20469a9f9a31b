"""Dataset readers by name (`data.dataset`). A reader takes the data config and returns the dataset's
(train pool, validation split or None, test split or None); makd/data/splits.py draws the configured subsets.
"""

from __future__ import annotations

from collections.abc import Callable

from makd.data.base import Pools
from makd.data.config import DataConfig
from makd.registry import Registry

Reader = Callable[[DataConfig], Pools]
DATASETS: Registry[Reader] = Registry("dataset", "data.dataset", modules=(
    "makd.data.fashion_mnist", "makd.data.imagefolder", "makd.data.manifest", "makd.data.finegrained"))
