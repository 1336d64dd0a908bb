"""Offline SignRound tuner: round-to-nearest and signed-gradient rounding, checkpoint writers."""
