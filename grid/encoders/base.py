"""The encoder interface: a dataset in, one embedding per item out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from grid.data import Dataset, Split


class Encoder(ABC):
    """Maps every catalogue item to a vector; collaborative encoders may read `split.train` only."""

    @abstractmethod
    def encode(self, dataset: Dataset, split: Split) -> np.ndarray:
        """Embeddings `[dataset.num_items, dim]` (float32), row i for internal item i."""
