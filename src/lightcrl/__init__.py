"""lightcrl: lightweight cross-modal representation learning on frozen encoders."""

__version__ = "0.1.0"


def load(run_dir, device: str = "auto", checkpoint: str | None = None):
    """Load a trained run as a model with encode_text / encode_image / encode_audio / classify."""
    from .api import load as _load

    return _load(run_dir, device=device, checkpoint=checkpoint)


__all__ = ["__version__", "load"]
