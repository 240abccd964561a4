"""grid: a framework for benchmarking semantic-ID generative recommenders."""

from grid.errors import GridError

__all__ = ["GridError", "load_run"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_run":  # torch loads only when a run does, not for every `grid` command
        from grid.recommend import load_run

        return load_run
    raise AttributeError(f"module 'grid' has no attribute {name!r}")
