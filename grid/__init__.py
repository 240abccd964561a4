"""grid: a framework for benchmarking semantic-ID generative recommenders."""

from grid.errors import GridError

__all__ = ["GridError"]
__version__ = "0.1.0"
