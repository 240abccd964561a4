"""Item encoders, registered under the `name` field of an `encoder` config."""

from grid.encoders.base import Encoder

ENCODERS: dict[str, type[Encoder]] = {}

__all__ = ["ENCODERS", "Encoder"]
