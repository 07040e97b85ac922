"""The ways a training stage ends early, each raised where it is found and turned into its
exit code (pipeline.exit_codes) by jobs.train."""
from __future__ import annotations


class BadInput(Exception):
    """A missing or malformed input, or GPUs asked for and none found; exit 2."""


class NonFiniteLoss(Exception):
    """A loss term or gradient norm became NaN/inf; exit 4 after saving error.pt."""


class Preempted(Exception):
    """A stop signal arrived; exit 75 after saving last.pt."""
