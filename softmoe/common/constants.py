"""Constants more than one stage agrees on."""

__all__ = ["IGNORE_INDEX"]

# Target id that scores nothing: torch's default `ignore_index` of cross_entropy. The data stage writes it
# (already-scored tail targets of the last eval window), the model's loss and the evaluation skip it.
IGNORE_INDEX = -100
