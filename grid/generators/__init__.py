"""Generators, registered under the names that `generator=NAME` selects."""

from grid.generators.base import PipelineInputs, Recommender
from grid.generators.popularity import Popularity
from grid.generators.rpg import RPG
from grid.generators.sasrec import SASRec
from grid.generators.setrec import SETRec
from grid.generators.simgr import SimGR
from grid.generators.tiger import TIGER

GENERATORS: dict[str, type[Recommender]] = {
    "popularity": Popularity,
    "rpg": RPG,
    "sasrec": SASRec,
    "setrec": SETRec,
    "simgr": SimGR,
    "tiger": TIGER,
}

__all__ = ["GENERATORS", "PipelineInputs", "Popularity", "Recommender"]
