"""Item encoders, registered under the `name` field of an `encoder` config."""

from grid.encoders.base import Encoder
from grid.encoders.cf import CollaborativeEncoder
from grid.encoders.text import TextEncoder

ENCODERS: dict[str, type[Encoder]] = {
    "cf": CollaborativeEncoder,
    "text": TextEncoder,
}

__all__ = ["ENCODERS", "Encoder", "TextEncoder"]
