"""Generators, registered under the names that `generator=NAME` selects."""

from grid.generators.base import PipelineInputs, Recommender
from grid.generators.popularity import Popularity

GENERATORS: dict[str, type[Recommender]] = {
    "popularity": Popularity,
}

__all__ = ["GENERATORS", "PipelineInputs", "Popularity", "Recommender"]
