"""lightcrl: lightweight cross-modal representation learning on frozen encoders.

The library (this package, except ``lightcrl.app``): encoders, data, feature store, features adapter,
model, losses, anchors, metrics, run directories and ``load``. The applications built on it (trainer,
evaluation orchestration, experiment grid, quickstart, search, report, CLI) live in ``lightcrl.app``, as
OpenCLIP keeps ``open_clip_train`` apart from ``open_clip``; the library never imports them.
"""

from lightcrl.version import __version__


def load(run_dir, device: str = "auto", checkpoint: str | None = None):
    """Load a trained run as a model with encode_text / encode_image / encode_audio / classify."""
    from lightcrl.api import load as _load

    return _load(run_dir, device=device, checkpoint=checkpoint)


def create_model(cfg, input_dims):
    """The trainable model (projections, context, DFE or two-tower heads) from a config and feature sizes."""
    from lightcrl.model import create_model as _create_model

    return _create_model(cfg, input_dims)


def build_loss(spec, *, gather: bool = True):
    """A combined loss module from ``{name: weight}`` (see ``lightcrl.losses``)."""
    from lightcrl.losses import build_loss as _build_loss

    return _build_loss(spec, gather=gather)


__all__ = ["__version__", "build_loss", "create_model", "load"]
