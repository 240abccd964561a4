"""SID tokenizers, registered under the names that `tokenizer=NAME` selects."""

from grid.tokenizers.base import Tokenizer
from grid.tokenizers.mq import MQTokenizer
from grid.tokenizers.opq import OptimizedPQ
from grid.tokenizers.rkmeans import ResidualKMeans
from grid.tokenizers.rqvae import RQVAE
from grid.tokenizers.rvq import ResidualVQ

TOKENIZERS: dict[str, type[Tokenizer]] = {
    "rkmeans": ResidualKMeans,
    "rvq": ResidualVQ,
    "rqvae": RQVAE,
    "opq": OptimizedPQ,
    "mq": MQTokenizer,
}

__all__ = [
    "TOKENIZERS",
    "Tokenizer",
    "ResidualKMeans",
    "ResidualVQ",
    "RQVAE",
    "OptimizedPQ",
    "MQTokenizer",
]
