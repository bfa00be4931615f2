"""lightcrl: lightweight cross-modal representation learning on frozen encoders."""

__version__ = "0.1.0"
