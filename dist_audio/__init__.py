"""dist_audio: train memory-hungry raw-audio models on one GPU or many without running out of memory."""

__version__ = "0.1.0"
