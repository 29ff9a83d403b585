"""Lightning callbacks: the lecture's console line and the visualisations."""

from cnnfeat.callbacks.epoch_summary import EpochSummary

__all__ = ["EpochSummary"]
