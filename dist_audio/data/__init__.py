"""Shards → per-rank batches in one global order (crop by seek, quantize, remix); see ``loader`` for the layout."""

from dist_audio.data.loader import AudioLoader, CorruptDataError, make_loader, valid_crop_starts
from dist_audio.data.quantize import dequantize, quantize, zero_level

__all__ = ["AudioLoader", "CorruptDataError", "dequantize", "make_loader", "quantize", "valid_crop_starts",
           "zero_level"]
