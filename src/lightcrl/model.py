"""Trainable part of LightCRL: per-modality projections, context fusion and one shared Deep Fusion Encoder.

Frozen encoders (image, text, audio, ...) run once and their token features are cached; this module consumes
them as ``tokens [B, T, D_in]`` with ``mask [B, T]`` (True = real token) and returns L2-normalised embeddings
in one shared space. ``arch="two_tower"`` is the CLIP/LiT-style baseline: one head per modality on the
masked-mean of the frozen features, no shared encoder and no context.

Design notes:

* The DFE adds no positional encoding (as in the paper): image tokens are a 7x7 map and text tokens come from
  an encoder that already mixed position in.
* ``pool="cls"`` uses ONE learnable CLS token shared by all modalities (modality identity comes from the
  context); with ``fusion="attention"`` the context token itself is the CLS, so no CLS parameter exists.
* Padded token values never matter: they are zeroed on entry, excluded as attention keys and from the mean.
* ``anchors`` (off by default) adds ASIF-style anchor coordinates learned next to the DFE; the embedding
  is then ``[cos(theta) z_dfe, sin(theta) z_anchor]`` (see ``anchors.py``).
* ``csa`` (off by default) joins CSA's canonical coordinates the same way, last (see ``canonical.py``).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from lightcrl.anchors import AnchorConfig, AnchorSpace
from lightcrl.canonical import CanonicalConfig, CanonicalSpace, canonical_embed
from lightcrl.features import masked_mean
from lightcrl.hubness import HubnessConfig, csls_offsets
from lightcrl.views import split_angles

__all__ = ["LightCRLModel", "ModelConfig", "ProjectionHead", "create_model"]

_MODALITY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED = {"logit_scale", "logit_bias"}


class RidgeConfig(BaseModel):
    """``arch: ridge``: a closed-form least-squares map of each media modality into the frozen ``target``
    space (see :class:`LightCRLModel` and ``lightcrl.app.train``). Nothing is trained by SGD: "epoch" i of a
    run fits the map with penalty ``lams[i - 1]`` and validates it, so the early-stopping metric chooses the
    penalty as it would choose an epoch."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # penalty x the number of training items, on the features standardised with the training items' mean
    # and spread (so one grid suits any feature scale)
    lams: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], min_length=1)
    target: str = "text"  # the modality kept as it is (normalised frozen feature): the space mapped into
    # subtract the training targets' mean from every target embedding (what all captions share)
    center: bool = False
    pool: Literal["mean", "max"] = "mean"  # how a media item's tokens become its feature
    # hubness correction in zero-shot classification (CSLS, Conneau et al. 2018): a class's score is
    # lowered by half its mean cosine to its ``csls`` nearest mapped TRAINING items (kept with the model),
    # so a class embedding close to everything stops taking every item; 0 = off
    csls: int = Field(0, ge=0)


class ModelConfig(BaseModel):
    """Hyper-parameters of the trainable model (unknown fields are rejected, naming the field)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # "anchors": the anchor space alone, no trained head (ASIF, see ``baselines/asif.py``)
    # "csa": one fixed linear map per modality of the centred, normalised pooled feature into ``width``
    # canonical dimensions, nothing trained (CSA, see ``baselines/csa.py``)
    # "ridge": a closed-form ridge map of each media modality's pooled feature into the frozen text space
    # (``ridge``: RidgeConfig), the text side fixed (lightcrl.app.train fits it)
    arch: Literal["dfe", "two_tower", "anchors", "csa", "ridge"] = "dfe"
    width: int = Field(256, ge=1)
    depth: int = Field(1, ge=1)
    heads: int = Field(4, ge=1)
    ffn_dim: int = Field(1024, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    norm_first: bool = True
    fusion: Literal["add", "mul", "concat", "attention", "none"] = "add"
    pool: Literal["mean", "cls"] = "mean"
    proj_hidden: int | None = Field(None, ge=1)
    proj_layers: int = Field(2, ge=1)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = Field(math.log(100), gt=0.0)
    learn_logit_scale: bool = True
    logit_bias: float | None = None
    input_norm: bool = True
    anchors: AnchorConfig | None = None
    csa: CanonicalConfig | None = None  # CSA's canonical coordinates joined to a trained arch
    # Keep what the frozen encoders know. Both use the "base map" of a modality: its frozen pooled feature,
    # L2-normalised, through a fixed matrix (the identity when the widths agree, else fixed orthonormal rows
    # or columns, seeded) and normalised again.
    # "gated": embedding = normalize(base + gate * head), one gate vector per modality initialised at zero,
    # so training starts from the base map and the head learns a residual on it.
    head: Literal["plain", "gated"] = "plain"
    # LiT: modalities with no trainable head; their embedding is the base map (e.g. [image])
    locked: list[str] = Field(default_factory=list)
    ridge: RidgeConfig | None = None  # arch "ridge" only (None there: the defaults)
    # CSLS in retrieval against training embeddings kept with the model (lightcrl/hubness.py)
    hubness: HubnessConfig | None = None

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.arch == "anchors" and self.anchors is None:
            raise ValueError("arch 'anchors' is the anchor space alone: it needs model.anchors")
        if self.arch in ("anchors", "csa", "ridge") and (self.locked or self.head != "plain"):
            raise ValueError("model.locked and model.head apply to the trained heads (dfe, two_tower)")
        if self.ridge is not None and self.arch != "ridge":
            raise ValueError("model.ridge configures arch 'ridge' only")
        if self.arch == "ridge" and self.anchors is not None:
            raise ValueError("arch 'ridge' takes no model.anchors")
        if self.csa is not None and self.arch not in ("dfe", "two_tower"):
            raise ValueError(f"model.csa joins CSA to a trained arch (dfe, two_tower), not {self.arch!r}"
                             + (" (arch 'csa' is CSA alone)" if self.arch == "csa" else ""))
        if any(a is not None for a in self.text_angles()) and self.arch not in ("dfe", "two_tower"):
            raise ValueError("text_mix splits the views joined to a trained arch (dfe, two_tower)")
        return self

    def text_angles(self) -> list[float | None]:
        """``text_mix`` of each joined view, inner first (anchors, then csa; lightcrl/views.py)."""
        views = [v for v in (self.anchors if self.arch != "anchors" else None, self.csa) if v is not None]
        return [v.text_mix for v in views]


class ProjectionHead(nn.Module):
    """[LayerNorm] -> Linear -> (GELU -> Linear)* -> Dropout -> LayerNorm, applied token-wise.

    The optional input LayerNorm evens out the very different feature scales of the frozen encoders.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden: int, layers: int, dropout: float, input_norm: bool
    ) -> None:
        super().__init__()
        self.input_norm: nn.Module = nn.LayerNorm(in_dim) if input_norm else nn.Identity()
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(dim, hidden), nn.GELU()]
            dim = hidden
        mods += [nn.Linear(dim, out_dim), nn.Dropout(dropout), nn.LayerNorm(out_dim)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.input_norm(x))


class ContextAttention(nn.Module):
    """Single-query scaled dot-product attention ("DFE-dot"): the context attends over the real tokens."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.scale = width**-0.5

    def forward(self, query: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        """query [W], tokens [B, T, W], mask [B, T] -> context token [B, W]."""
        scores = torch.einsum("btw,w->bt", self.key(tokens), query) * self.scale
        # A finite fill (not -inf) keeps fully padded rows NaN-free; their weights are zeroed just below.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1) * mask.any(dim=-1, keepdim=True)
        # Residual on the query so the token keeps the modality identity even for an empty input.
        return query + torch.einsum("bt,btw->bw", weights, self.value(tokens))


def _count(params: Any) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


class LightCRLModel(nn.Module):
    """LightCRL (``arch="dfe"``) or the two-tower baseline over cached frozen features.

    ``input_dims`` maps each modality name to its frozen feature size, e.g. ``{"image": 1280, "text": 384}``.
    """

    def __init__(self, cfg: ModelConfig, input_dims: Mapping[str, int]) -> None:
        super().__init__()
        _check_input_dims(input_dims)
        self.cfg = cfg.model_copy()
        self.input_dims = {m: int(d) for m, d in input_dims.items()}
        unknown = sorted(set(cfg.locked) - set(self.input_dims))
        if unknown:
            raise ValueError(f"model.locked names {unknown}, not modalities of this model {self.modalities}")
        if cfg.arch == "ridge":
            if self.cfg.ridge is None:
                self.cfg.ridge = RidgeConfig()
            target = self.cfg.ridge.target
            if target not in self.input_dims or len(self.input_dims) < 2:
                raise ValueError(f"arch 'ridge' maps into model.ridge.target {target!r}: it must be one of "
                                 f"this model's modalities {self.modalities}, beside at least one other")
            self.cfg.width = self.input_dims[target]  # the embedding space is the target's own
            for m in self.input_dims:  # set by lightcrl.app.train's closed-form fit
                self.register_buffer(f"ridge_mean_{m}", torch.zeros(self.input_dims[m]))
                if m != target:
                    self.register_buffer(f"ridge_map_{m}", torch.zeros(self.input_dims[m], self.cfg.width))
                    # the mapped training items (rows: unit embeddings), for csls; sized by the fit
                    self.register_buffer(f"ridge_hub_{m}", torch.zeros(0, self.cfg.width))
        width = self.cfg.width
        hidden = cfg.proj_hidden or width
        fixed = cfg.arch in ("anchors", "csa", "ridge")  # training-free: no head at all
        trained = [m for m in self.input_dims if m not in cfg.locked] if not fixed else []
        for m in self.input_dims if cfg.arch == "csa" else []:  # set by lightcrl.baselines.csa
            self.register_buffer(f"csa_mean_{m}", torch.zeros(self.input_dims[m]))
            self.register_buffer(f"csa_map_{m}", torch.zeros(self.input_dims[m], width))
        self.projections = nn.ModuleDict(
            {
                m: ProjectionHead(
                    self.input_dims[m], width, hidden, cfg.proj_layers, cfg.dropout, cfg.input_norm
                )
                for m in trained
            }
        )
        # the fixed base maps (buffers: saved with the weights, never trained)
        self.base_maps: dict[str, str] = {}
        for m in self.input_dims if (cfg.locked or cfg.head == "gated") else []:
            name = f"base_map_{m}"
            self.register_buffer(name, _fixed_map(self.input_dims[m], width, seed=len(self.base_maps)))
            self.base_maps[m] = name
        self.gates: nn.ParameterDict | None = None
        if cfg.head == "gated" and trained:
            self.gates = nn.ParameterDict({m: nn.Parameter(torch.zeros(width)) for m in trained})
        self.contexts: nn.ParameterDict | None = None
        self.g3: nn.Linear | None = None
        self.fusion_mlp: nn.Sequential | None = None
        self.context_attention: ContextAttention | None = None
        self.cls_token: nn.Parameter | None = None
        self.dfe: nn.TransformerEncoder | None = None
        if cfg.arch == "dfe":
            if cfg.fusion != "none":
                # Unit-scale init: g3(ctx) then starts on the order of the LayerNorm-ed tokens, so "mul"
                # does not begin by shrinking every token towards zero and "add" is visible from step one.
                self.contexts = nn.ParameterDict({m: nn.Parameter(torch.randn(width)) for m in trained})
                self.g3 = nn.Linear(width, width)
            if cfg.fusion == "concat":
                self.fusion_mlp = nn.Sequential(
                    nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, width)
                )
            elif cfg.fusion == "attention":
                self.context_attention = ContextAttention(width)
            if cfg.pool == "cls" and cfg.fusion != "attention":
                self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
            layer = nn.TransformerEncoderLayer(
                d_model=width,
                nhead=cfg.heads,
                dim_feedforward=cfg.ffn_dim,
                dropout=cfg.dropout,
                batch_first=True,
                norm_first=cfg.norm_first,
            )
            self.dfe = nn.TransformerEncoder(
                layer,
                num_layers=cfg.depth,
                norm=nn.LayerNorm(width) if cfg.norm_first else None,
                # Nested tensors only pay off at inference on long padded batches; keep one code path.
                enable_nested_tensor=False,
            )
        # Stored as log-scale like CLIP/OpenCLIP; exp() and clamped on use.
        self.logit_scale = nn.Parameter(
            torch.tensor(float(cfg.init_logit_scale)), requires_grad=cfg.learn_logit_scale
        )
        self.logit_bias: nn.Parameter | None = None
        if cfg.logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.logit_bias)))
        self.anchors: AnchorSpace | None = None
        if cfg.anchors is not None:  # count 0 raises: anchors are built from data (see anchors.py)
            # joined to a trained part (mixing angle, optional output map), or standing alone
            self.anchors = AnchorSpace(cfg.anchors, self.input_dims, width if cfg.arch != "anchors" else None)
        # rank 0 raises: fitted by the trainer on the training pairs (see canonical.py)
        self.canonical = CanonicalSpace(cfg.csa, self.input_dims) if cfg.csa is not None else None
        # text_mix: text-text similarity weighs the joined views apart from cross-modal (views.py)
        self.text_modality: str | None = None
        if any(a is not None for a in cfg.text_angles()):
            if "text" not in self.input_dims or len(self.input_dims) != 2:
                raise ValueError("text_mix needs a model of text and one other modality (with three, "
                                    f"every pair's similarity cannot be kept), not {list(self.input_dims)}")
            self.text_modality = "text"
        for m in self.input_dims if cfg.hubness is not None else []:  # set by the trainer (set_hubness_bank)
            self.register_buffer(f"hub_{m}", torch.zeros(0, self.embed_dim, dtype=torch.float16))

    @property
    def modalities(self) -> list[str]:
        return list(self.input_dims)

    @property
    def embed_dim(self) -> int:
        dim = self.cfg.width
        if self.anchors is not None and self.cfg.arch == "anchors":
            dim = self.anchors.dim
        elif self.anchors is not None:
            dim = self.anchors.dim + (self.cfg.width if self.cfg.anchors.join == "concat" else 0)
        return dim + (self.canonical.dim if self.canonical is not None else 0)

    def get_logit_scale(self) -> Tensor:
        """exp(logit_scale), clamped at exp(max_logit_scale); divided by the views' cross-modal factor
        kappa when text has its own angles, so the logits are those of the symmetric joins (views.py)."""
        scale = self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp()
        return scale if self.text_modality is None else scale / self.view_angles("text")[1]

    def view_angles(self, modality: str) -> tuple[list[Tensor], Tensor]:
        """The joined views' angles for ``modality`` (anchors, then csa: those present) and kappa, the
        factor of every cross-modal cosine against the symmetric joins (1 without ``text_mix``)."""
        thetas = [v.mix for v in (self.anchors, self.canonical) if v is not None and v.mix is not None]
        if self.text_modality is None:
            return thetas, torch.ones((), device=self.logit_scale.device)
        text, media, kappa = split_angles(thetas, self.cfg.text_angles())
        return (text if modality == self.text_modality else media), kappa

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the stored log-scale into [0, max_logit_scale]; call after each optimizer step."""
        self.logit_scale.clamp_(0.0, self.cfg.max_logit_scale)

    def encode(
        self, modality: str, tokens: Tensor, mask: Tensor | None = None, exclude: Tensor | None = None
    ) -> Tensor:
        """Embed one modality: tokens [B, T, D_in] (or [B, D_in]), mask [B, T] -> [B, embed_dim], L2-normed.

        ``exclude`` [B] (anchors only): each row's own anchor id (-1 = none), left out during training.
        """
        tokens, mask = self._check_inputs(modality, tokens, mask)
        # Zero padding on entry so no value there (even NaN/inf from a cache) can reach the output.
        if _may_pad(mask):
            tokens = tokens.masked_fill(~mask.unsqueeze(-1), 0.0)
        if self.cfg.arch == "anchors":
            return self.anchors.embed(modality, masked_mean(tokens, mask), exclude)
        if self.cfg.arch == "csa":
            return canonical_embed(masked_mean(tokens, mask), getattr(self, f"csa_mean_{modality}"),
                                   getattr(self, f"csa_map_{modality}"))
        if self.cfg.arch == "ridge":
            mean = getattr(self, f"ridge_mean_{modality}")
            if modality == self.cfg.ridge.target:  # the frozen space itself, minus the targets' mean
                return F.normalize(F.normalize(masked_mean(tokens, mask), dim=-1) - mean, dim=-1)
            x = self.ridge_features(tokens, mask) - mean
            return F.normalize(x @ getattr(self, f"ridge_map_{modality}"), dim=-1)
        z = self._encode_tokens(modality, tokens, mask)
        angles = iter(self.view_angles(modality)[0]) if self.text_modality is not None else None
        if self.anchors is not None:
            z = self.anchors.join(z, self.anchors.embed(modality, masked_mean(tokens, mask), exclude),
                                  next(angles) if angles else None)
        if self.canonical is not None:
            z = self.canonical.join(z, self.canonical.embed(modality, masked_mean(tokens, mask)),
                                    next(angles) if angles else None)
        return z

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # ridge_hub_* and hub_* hold as many rows as there were training items: take the saved size
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if name.startswith(("ridge_hub_", "hub_")) and saved is not None and saved.shape != buf.shape:
                self._buffers[name] = buf.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def zeroshot_bias(self, class_emb: Any, modality: str) -> Any:
        """Per-class offsets [C] added to the cosine scores of zero-shot classification of ``modality``
        items against the unit class embeddings ``class_emb`` [C, d] (numpy), or None (no offset).

        arch ridge with ``csls: k``: ``-r_c / 2``, r_c the mean cosine of class c to its k nearest mapped
        training items, so the argmax is CSLS's ``2 cos(z, c) - r_c`` (the item's own term is the same for
        every class)."""
        if self.cfg.arch != "ridge" or not self.cfg.ridge.csls:
            return None
        hub = getattr(self, f"ridge_hub_{modality}", None)
        if hub is None or not len(hub):
            return None
        return csls_offsets(class_emb, hub.cpu(), self.cfg.ridge.csls)  # the classes are the gallery

    def set_hubness_bank(self, embeddings: dict[str, Any]) -> None:
        """``model.hubness``: the training items' embeddings [n, embed_dim] per modality, as computed by
        this model's current weights (kept as float16 unit rows)."""
        import numpy as np

        for m, emb in embeddings.items():
            rows = F.normalize(torch.as_tensor(np.asarray(emb, np.float32)), dim=-1)
            setattr(self, f"hub_{m}", rows.to(torch.float16).to(self.logit_scale.device))

    def retrieval_offsets(self, gallery_emb: Any, query_modality: str) -> Any:
        """Per-gallery-item offsets [N] added to the cosine scores of ``query_modality`` queries against
        ``gallery_emb`` [N, d] (numpy, unit rows): CSLS's ``-r_g / 2`` against the training embeddings of the
        query modality (``model.hubness``), or None (plain cosine)."""
        bank = getattr(self, f"hub_{query_modality}", None) if self.cfg.hubness is not None else None
        if bank is None or not len(bank):
            return None
        return csls_offsets(gallery_emb, bank.cpu(), self.cfg.hubness.k)

    def ridge_features(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """arch ridge: a media item's feature, its tokens' masked mean or max (``model.ridge.pool``)."""
        if tokens.dim() == 2:
            return tokens
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if self.cfg.ridge.pool == "max":
            return tokens.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1).nan_to_num(0.0, 0.0, 0.0)
        return masked_mean(tokens, mask)

    def base_map(self, modality: str, tokens: Tensor, mask: Tensor) -> Tensor:
        """The fixed map of the frozen pooled feature (unit norm): a locked modality's embedding, and what a
        gated head starts from. With equal widths it is the normalised frozen feature itself."""
        matrix = getattr(self, self.base_maps[modality])
        return F.normalize(F.normalize(masked_mean(tokens, mask), dim=-1) @ matrix.T, dim=-1)

    def _encode_tokens(self, modality: str, tokens: Tensor, mask: Tensor) -> Tensor:
        if modality in self.cfg.locked:
            return self.base_map(modality, tokens, mask)
        head = self._head(modality, tokens, mask)
        if self.gates is None:
            return F.normalize(head, dim=-1)
        # the head's output is LayerNorm-ed (norm ~ sqrt(width)), so a small gate already moves the embedding
        return F.normalize(self.base_map(modality, tokens, mask) + self.gates[modality] * head, dim=-1)

    def _head(self, modality: str, tokens: Tensor, mask: Tensor) -> Tensor:
        """The trained head's pooled output, before normalisation."""
        if self.dfe is None:  # two_tower
            return self.projections[modality](masked_mean(tokens, mask))

        x = self.projections[modality](tokens)
        x, mask = self._fuse(modality, x, mask)
        if self.cls_token is not None:
            x, mask = _prepend(self.cls_token.expand(x.shape[0], -1), x, mask)
        # A row without any real token would have every attention key masked (NaN): let it attend to its
        # padding instead; its pooled output is zero (mean) or the CLS token, either way finite.
        key_padding = ~mask & mask.any(dim=1, keepdim=True) if _may_pad(mask) else None
        x = self.dfe(x, src_key_padding_mask=key_padding)
        return x[:, 0] if self.cfg.pool == "cls" else masked_mean(x, mask)

    def forward(
        self,
        batch: Mapping[str, tuple[Tensor, Tensor | None] | Tensor],
        exclude: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``{modality: (tokens, mask)}`` -> ``{modality: embedding, "logit_scale": s, ["logit_bias": b]}``.

        A bare tensor stands for tokens without padding. ``exclude``: anchor ids to leave out, shared by
        the modalities of a batch of pairs (see ``encode``).
        """
        out: dict[str, Tensor] = {}
        for modality, item in batch.items():
            tokens, mask = (item, None) if isinstance(item, Tensor) else item
            out[modality] = self.encode(modality, tokens, mask, exclude)
        out["logit_scale"] = self.get_logit_scale()
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part; the parts sum to ``total_trainable``."""
        counts = {f"projection/{m}": _count(p.parameters()) for m, p in self.projections.items()}
        counts["context"] = _count(self.contexts.parameters()) if self.contexts is not None else 0
        counts["g3"] = _count(self.g3.parameters()) if self.g3 is not None else 0
        fusion = self.fusion_mlp if self.fusion_mlp is not None else self.context_attention
        counts["fusion"] = _count(fusion.parameters()) if fusion is not None else 0
        counts["cls"] = _count([self.cls_token]) if self.cls_token is not None else 0
        counts["dfe"] = _count(self.dfe.parameters()) if self.dfe is not None else 0
        counts["gate"] = _count(self.gates.parameters()) if self.gates is not None else 0
        counts["logit_scale"] = _count([self.logit_scale])
        counts["logit_bias"] = _count([self.logit_bias]) if self.logit_bias is not None else 0
        counts["anchors"] = _count(self.anchors.parameters()) if self.anchors is not None else 0
        counts["csa"] = _count(self.canonical.parameters()) if self.canonical is not None else 0
        counts["total_trainable"] = _count(self.parameters())
        return counts

    def _fuse(self, modality: str, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if self.contexts is None or self.g3 is None:  # fusion="none"
            return x, mask
        ctx = self.g3(self.contexts[modality])
        fusion = self.cfg.fusion
        if fusion == "add":
            return x + ctx, mask
        if fusion == "mul":
            return x * ctx, mask
        if fusion == "concat":
            assert self.fusion_mlp is not None
            return self.fusion_mlp(torch.cat([x, ctx.expand_as(x)], dim=-1)), mask
        assert self.context_attention is not None  # fusion="attention"
        return _prepend(self.context_attention(ctx, x, mask), x, mask)

    def _check_inputs(self, modality: str, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if modality not in self.input_dims:
            raise ValueError(f"unknown modality {modality!r}; this model has {self.modalities}")
        if tokens.dim() == 2:  # pooled features [B, D] are a one-token sequence
            tokens = tokens.unsqueeze(1)
        if tokens.dim() != 3 or tokens.shape[-1] != self.input_dims[modality]:
            raise ValueError(
                f"{modality}: expected tokens [B, T, {self.input_dims[modality]}], got {tuple(tokens.shape)}"
            )
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(
                f"{modality}: mask {tuple(mask.shape)} does not match tokens {tuple(tokens.shape)}"
            )
        # Cached features may be stored in half precision.
        return tokens.to(self.logit_scale.dtype), mask.to(device=tokens.device, dtype=torch.bool)


def _fixed_map(in_dim: int, out_dim: int, seed: int) -> Tensor:
    """[out_dim, in_dim]: the identity when the widths agree, else orthonormal rows (a projection) or columns
    (an isometry) from a seeded generator of its own, so building it leaves the global RNG untouched."""
    if in_dim == out_dim:
        return torch.eye(out_dim)
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    q, _ = torch.linalg.qr(torch.randn(max(in_dim, out_dim), min(in_dim, out_dim), generator=gen))
    return q.T.contiguous() if out_dim < in_dim else q.contiguous()


def _may_pad(mask: Tensor) -> bool:
    """Whether ``mask`` may hold padding. Checked on the CPU only, where it costs one small reduction and
    spares a copy of the batch (masked_fill) and the attention-mask arithmetic when nothing is padded
    (image tokens never are): the result is bit-identical. On a GPU the check would sync every step, and
    a traced or exported graph (ONNX export) must keep the masking for any input, so there it always
    runs."""
    if mask.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return True
    if torch.compiler.is_exporting():
        return True
    return not bool(mask.all())


def _prepend(token: Tensor, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Prepend token [B, W] to x [B, T, W] as a real (unmasked) position."""
    real = torch.ones(mask.shape[0], 1, dtype=torch.bool, device=mask.device)
    return torch.cat([token.unsqueeze(1), x], dim=1), torch.cat([real, mask], dim=1)


def _check_input_dims(input_dims: Mapping[str, int]) -> None:
    if not input_dims:
        raise ValueError("input_dims is empty: give at least one modality, e.g. {'image': 1280, 'text': 384}")
    for name, dim in input_dims.items():
        if not _MODALITY_NAME.match(name) or name in _RESERVED:
            raise ValueError(
                f"invalid modality name {name!r}: use a Python identifier other than {sorted(_RESERVED)}"
            )
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"input_dims[{name!r}] must be a positive int, got {dim!r}")


def create_model(cfg: ModelConfig | Mapping[str, Any], input_dims: Mapping[str, int]) -> LightCRLModel:
    """Build a model from a config (or a plain dict of config fields) and the frozen feature sizes."""
    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.model_validate(dict(cfg))
    return LightCRLModel(cfg, input_dims)
