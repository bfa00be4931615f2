"""The unit every loader yields and the feature store keeps: one record per stored item."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """One item of a dataset split.

    id:     unique within the split (an image's relative path; a caption is ``"<image id>#<k>"``).
    path:   the media file (image or audio) or None for text records. For media inside a tar shard
            (``wds:``) it is ``"<tar path>::<member name>"``.
    text:   the caption of a text record (None for media records).
    group:  the media id a record belongs to: itself for media, its image/audio for a caption. Pairs are
            (media record, text record) with ``text.group == media.id``.
    label:  class index for classification datasets, -1 otherwise.
    """

    id: str
    path: str | None = None
    text: str | None = None
    group: str = ""
    label: int = -1

    def to_dict(self) -> dict:
        # by hand: dataclasses.asdict deep-copies field by field, 10x slower (plans hold every record)
        return {"id": self.id, "path": self.path, "text": self.text, "group": self.group, "label": self.label}
