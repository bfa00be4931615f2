"""Exceptions with messages meant for the user."""


class LightCRLError(Exception):
    """An error the CLI reports as one clear line (no traceback)."""


class SkipItem(LightCRLError):
    """Raised for one bad input item (corrupt image, empty caption...): a long job skips and counts it;
    given alone (``model.encode_image([path])``) it is the user's error, reported as one clear line.

    ``reason`` is a short machine-friendly tag (e.g. ``"corrupt_image"``), ``str(exc)`` the detail.
    """

    def __init__(self, reason: str, detail: str = "", path: str | None = None):
        self.reason = reason
        self.path = path
        super().__init__(f"{reason}: {detail}" if detail else reason)


class StoreMismatch(LightCRLError):
    """A feature store or checkpoint was made from other inputs (fingerprint or version differs)."""
