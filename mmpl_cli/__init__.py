"""mmpl: a batch renderer for long AI video with Macro-from-Micro Planning (MMPL)."""

__version__ = "0.1.0"
