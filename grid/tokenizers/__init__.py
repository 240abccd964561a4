"""SID tokenizers, registered under the names that `tokenizer=NAME` selects."""

from grid.tokenizers.base import Tokenizer
from grid.tokenizers.rkmeans import ResidualKMeans

TOKENIZERS: dict[str, type[Tokenizer]] = {
    "rkmeans": ResidualKMeans,
}

__all__ = ["TOKENIZERS", "Tokenizer", "ResidualKMeans"]
