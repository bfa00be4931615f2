"""Contrastive losses of LightCRL and of the loss study (CLIP, CyCLIP, SigLIP, ConVIRT, SimCSE).

Every loss is an ``nn.Module`` whose forward returns a dict of named scalar terms including ``"loss"``.
Cross-modal losses share one signature, ``forward(a, b, logit_scale, logit_bias=None)``, with ``a`` and
``b`` the paired embeddings ``[N, d]``, L2-normalised, ``a`` the first modality (the image for ConVIRT) and
``logit_scale`` the already exp()'d scale. With ``gather=True`` and a process group of more than one rank,
inputs are all-gathered with gradients first, so every rank's loss is the global-batch loss.

:func:`build_loss` combines several losses with weights from a plain dict spec.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightcrl.distributed import all_gather_with_grad

__all__ = [
    "LOSSES",
    "ClipLoss",
    "CombinedLoss",
    "ConVIRTLoss",
    "CyClipLoss",
    "LightCRLLoss",
    "MultiPositiveClipLoss",
    "SigLipLoss",
    "SimCSELoss",
    "StructureLoss",
    "SupSimCSELoss",
    "build_loss",
]

Inputs = Literal["pair", "text_views", "nli"]


class _Loss(nn.Module):
    """Base: the gather flag and which inputs the loss consumes (used by :class:`CombinedLoss`)."""

    inputs: ClassVar[Inputs] = "pair"
    needs_logit_scale: ClassVar[bool] = True
    needs_logit_bias: ClassVar[bool] = False
    #: extra keyword inputs of a "pair" loss: the frozen pooled features (``frozen=``), the media item of
    #: every row (``groups=``), the optimizer step (``step=``, for a ramp-in)
    wants_frozen: bool = False
    wants_groups: ClassVar[bool] = False
    wants_step: ClassVar[bool] = False

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def _gather(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(all_gather_with_grad(x) for x in xs) if self.gather else xs

    def uses_logit_scale(self) -> bool:
        return self.needs_logit_scale


def _labels(logits: Tensor) -> Tensor:
    return torch.arange(logits.shape[0], device=logits.device)


def _clip_terms(a: Tensor, b: Tensor, logit_scale: Tensor | float) -> dict[str, Tensor]:
    logits = logit_scale * a @ b.T
    labels = _labels(logits)
    a_to_b = F.cross_entropy(logits, labels)
    b_to_a = F.cross_entropy(logits.T, labels)
    return {"loss": (a_to_b + b_to_a) / 2, "a_to_b": a_to_b, "b_to_a": b_to_a}


class ClipLoss(_Loss):
    """Symmetric InfoNCE with hard (diagonal) targets (CLIP, Radford et al. 2021)."""

    def forward(
        self, a: Tensor, b: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``logit_bias`` is accepted for a uniform interface: a constant shift leaves softmax unchanged."""
        a, b = self._gather(a, b)
        return _clip_terms(a, b, logit_scale)


class LightCRLLoss(_Loss):
    """LightCRL's soft-target contrastive loss (paper eq. 1-3).

    Targets ``t_ij = softmax_j(s_t * (<a_i,a_j> + <b_i,b_j>) / 2)`` spread probability over pairs that look
    alike in *both* modalities (near-duplicate captions/images), and the logits ``s * <a_i,b_j>`` are fit
    to them by cross-entropy in both directions. The averaged in-modal similarity matrix is symmetric, so
    the row-normalised targets serve both directions. ``s_t`` is the model's logit scale unless
    ``target_scale`` fixes it; as it grows (or when in-modal similarities are identity-like) the targets
    become one-hot and the loss is :class:`ClipLoss`.

    ``targets="embeddings"`` (the paper) takes the in-modal similarities from the trained embeddings
    ``a, b``. That has a trivial minimum: when every embedding is alike, targets and predictions are both
    uniform and the loss is at its floor, and training does drift there (target entropy -> log N).
    ``targets="frozen"`` takes them from the frozen encoders' pooled features instead (``frozen=(fa, fb)``,
    passed by the trainer), which the model cannot move, so the soft targets keep their meaning.

    ``detach_targets=True`` (default) treats the targets as labels: without the stop-gradient the loss can
    also drop by reshaping the in-modal geometry towards the current cross-modal logits, i.e. the targets
    chase the predictions instead of supervising them. ``False`` reproduces the reference implementation
    (gradients through the targets).
    """

    def __init__(
        self,
        gather: bool = True,
        detach_targets: bool = True,
        target_scale: float | None = None,
        targets: Literal["embeddings", "frozen"] = "embeddings",
    ):
        super().__init__(gather)
        if targets not in ("embeddings", "frozen"):
            raise ValueError(f"targets must be 'embeddings' or 'frozen', not {targets!r}")
        self.detach_targets = detach_targets
        self.target_scale = target_scale
        self.targets = targets
        self.wants_frozen = targets == "frozen"

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | None = None,
        frozen: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """``logit_bias`` is accepted for a uniform interface: a constant shift leaves softmax unchanged."""
        a, b = self._gather(a, b)
        logits = logit_scale * a @ b.T
        scale = logit_scale if self.target_scale is None else self.target_scale
        if self.wants_frozen:
            if frozen is None:
                raise ValueError("lightcrl with targets='frozen' needs frozen=(fa, fb), the frozen features")
            fa, fb = (F.normalize(x.detach().float(), dim=-1) for x in self._gather(*frozen))
            with torch.no_grad():
                targets = F.softmax(scale * (fa @ fa.T + fb @ fb.T) / 2, dim=-1)
        else:
            with torch.no_grad() if self.detach_targets else contextlib.nullcontext():
                targets = F.softmax(scale * (a @ a.T + b @ b.T) / 2, dim=-1)
        a_to_b = F.cross_entropy(logits, targets)
        b_to_a = F.cross_entropy(logits.T, targets)
        with torch.no_grad():
            entropy = -(targets * targets.clamp_min(1e-12).log()).sum(dim=-1).mean()
        return {"loss": (a_to_b + b_to_a) / 2, "a_to_b": a_to_b, "b_to_a": b_to_a, "target_entropy": entropy}


class MultiPositiveClipLoss(_Loss):
    """Symmetric InfoNCE where every caption of an image in the batch is a positive (multi-positive CLIP).

    ``groups`` [N] names the media item of each row (the trainer passes the media index of each pair); rows
    ``i, j`` are positives when ``groups[i] == groups[j]``. In each direction a row's loss is the mean
    negative log-softmax over its positives, ``-1/|P_i| sum_{j in P_i} log softmax_j(s <a_i, b_j>)``, i.e.
    cross-entropy against the uniform distribution over the positives. With one caption per image (all
    groups distinct) it is exactly :class:`ClipLoss`; without ``groups`` every row is its own group.
    Batches with several captions per image come from ``data.pairs: multi_caption``.
    """

    wants_groups: ClassVar[bool] = True

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | None = None,
        groups: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``logit_bias`` is accepted for a uniform interface: a constant shift leaves softmax unchanged."""
        a, b = self._gather(a, b)
        if groups is None:
            groups = torch.arange(a.shape[0], device=a.device)
        elif self.gather:
            groups = all_gather_with_grad(groups)
        groups = groups.to(a.device)
        if groups.shape != (a.shape[0],):
            raise ValueError(f"groups must be [N] = [{a.shape[0]}], got {tuple(groups.shape)}")
        positives = (groups[:, None] == groups[None, :]).to(a.dtype)
        targets = positives / positives.sum(dim=1, keepdim=True)  # symmetric support, row-normalised
        logits = logit_scale * a @ b.T
        a_to_b = F.cross_entropy(logits, targets)
        b_to_a = F.cross_entropy(logits.T, targets)
        with torch.no_grad():
            mean_positives = positives.sum(dim=1).mean()
        loss = (a_to_b + b_to_a) / 2
        return {"loss": loss, "a_to_b": a_to_b, "b_to_a": b_to_a, "positives": mean_positives}


def neighbour_distribution(x: Tensor, tau: float) -> Tensor:
    """Row-stochastic neighbour matrix of a batch: ``softmax_j(cos_c(x_i, x_j) / tau)`` over ``j != i``.

    ``cos_c`` is the cosine after centring the L2-normalised rows on their batch mean (so a common offset,
    e.g. the positive bias of post-ReLU features, does not make everything look alike). An item is not its
    own neighbour: the diagonal gets probability 0.
    """
    x = F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=-1)
    x = F.normalize(x - x.mean(dim=0, keepdim=True), dim=-1)
    logits = (x @ x.T) / tau
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return logits.masked_fill(eye, float("-inf")).softmax(dim=-1)


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between the rows of two row-stochastic matrices, one value per row."""
    m = (p + q) / 2
    tiny = torch.finfo(m.dtype).tiny
    log_m = m.clamp_min(tiny).log()

    def kl_to_m(x: Tensor) -> Tensor:  # 0 log 0 = 0, with finite gradients where x = m = 0 (the diagonal)
        return torch.where(x > 0, x * (x.clamp_min(tiny).log() - log_m), torch.zeros_like(x)).sum(dim=-1)

    return (kl_to_m(p) + kl_to_m(q)) / 2


class StructureLoss(_Loss):
    """STRUCTURE (Gröger et al., NeurIPS 2025): keep each modality's neighbourhood structure of the frozen
    encoder in the aligned space.

    For each modality, ``P = neighbour_distribution(frozen, tau)`` (the frozen pooled features, fixed) and
    ``Q = neighbour_distribution(aligned, tau)`` (the trained embeddings) are one-step random walks on the
    batch; the loss compares their ``l``-step walks ``P^l, Q^l`` for ``l = 1..levels`` by the row-wise
    Jensen-Shannon divergence, weighted ``1/l`` and normalised by ``sum_l 1/l``, averaged over rows and
    then over the two modalities. It is 0 when the aligned embeddings have the frozen features' cosine
    geometry (e.g. are a rotation of them) and only the aligned side gets gradients.

    ``unpaired``: sources of unpaired items of one modality (:class:`lightcrl.data.sources.UnpairedSource`,
    TRAINING splits only). The trainer draws ``per_batch`` of them per step and passes their frozen
    features and aligned embeddings as ``unpaired=``; they join that modality's walk (the batch's items
    and the unpaired ones are one neighbourhood), so the term also keeps the structure of data that has
    no partner. They enter no contrastive term.

    ``warmup_steps`` ramps the term in linearly: at optimizer step ``t`` (passed by the trainer as
    ``step=``, 0-based) it is multiplied by ``min(1, (t + 1) / warmup_steps)``, so the contrastive loss
    shapes the space before the regulariser pulls on it; the weight applied is logged as ``ramp``.
    Use beside a contrastive loss: ``loss: {clip: 1.0, structure: {weight: 1.0, tau: 0.05, levels: 2}}``.
    """

    needs_logit_scale: ClassVar[bool] = False
    wants_step: ClassVar[bool] = True

    def __init__(self, gather: bool = True, tau: float = 0.05, levels: int = 1, warmup_steps: int = 0,
                 unpaired: list[Mapping[str, Any]] | None = None):
        super().__init__(gather)
        if tau <= 0 or levels < 1 or warmup_steps < 0:
            raise ValueError(f"structure needs tau > 0, levels >= 1, warmup_steps >= 0; got {tau}, {levels}, "
                             f"{warmup_steps}")
        self.tau = float(tau)
        self.levels = int(levels)
        self.warmup_steps = int(warmup_steps)
        self.wants_frozen = True
        from pydantic import ValidationError

        from lightcrl.data.sources import UnpairedSource

        self.unpaired: list[UnpairedSource] = []
        for i, src in enumerate(unpaired or []):
            try:
                self.unpaired.append(UnpairedSource.model_validate(dict(src)))
            except (ValidationError, TypeError) as e:
                msgs = e.errors() if isinstance(e, ValidationError) else [{"msg": str(e), "loc": ()}]
                detail = "; ".join(f"{'.'.join(map(str, m['loc'])) or 'entry'}: {m['msg']}" for m in msgs)
                raise ValueError(f"structure.unpaired[{i}]: {detail}") from None
        self.wants_unpaired = bool(self.unpaired)

    def uses_logit_scale(self) -> bool:
        return False

    def ramp(self, step: int | None) -> float:
        if step is None or not self.warmup_steps:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)

    def divergence(self, frozen: Tensor, aligned: Tensor) -> Tensor:
        """The level-weighted mean JS divergence between the frozen and aligned walks of one modality."""
        with torch.no_grad():
            p = neighbour_distribution(frozen.detach(), self.tau)
        q = neighbour_distribution(aligned, self.tau)
        total, weights = aligned.new_zeros((), dtype=torch.float32), 0.0
        p_l, q_l = p, q
        for level in range(1, self.levels + 1):
            if level > 1:
                p_l, q_l = p_l @ p, q_l @ q
            total = total + js_divergence(p_l, q_l).mean() / level
            weights += 1.0 / level
        return total / weights

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        logit_scale: Tensor | float | None = None,
        logit_bias: Tensor | None = None,
        frozen: tuple[Tensor, Tensor] | None = None,
        step: int | None = None,
        unpaired: tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None] | None = None,
    ) -> dict[str, Tensor]:
        """``logit_scale``/``logit_bias`` are accepted for a uniform interface and unused. ``unpaired``:
        per side (a, b), None or (frozen features, aligned embeddings) of unpaired items of that modality,
        appended to the side's walk."""
        if frozen is None:
            raise ValueError("structure needs frozen=(fa, fb), the frozen encoders' pooled features")
        a, b = self._gather(a, b)
        fa, fb = self._gather(*frozen)
        if fa.shape[0] != a.shape[0] or fb.shape[0] != b.shape[0]:
            raise ValueError(f"frozen features ({fa.shape[0]}, {fb.shape[0]} rows) do not match the batch "
                             f"({a.shape[0]}, {b.shape[0]} rows)")
        if self.unpaired and unpaired is None:
            raise ValueError("structure has unpaired sources: pass unpaired=(side a, side b)")
        for side, extra in enumerate(unpaired or (None, None)):
            if extra is None:
                continue
            fu, zu = self._gather(*extra)
            if side == 0:
                fa, a = torch.cat([fa, fu.to(fa.dtype)]), torch.cat([a, zu.to(a.dtype)])
            else:
                fb, b = torch.cat([fb, fu.to(fb.dtype)]), torch.cat([b, zu.to(b.dtype)])
        js_a, js_b = self.divergence(fa, a), self.divergence(fb, b)
        ramp = self.ramp(step)
        return {"loss": ramp * (js_a + js_b) / 2, "js_a": js_a.detach(), "js_b": js_b.detach(),
                "ramp": torch.tensor(ramp)}


class CyClipLoss(_Loss):
    """CLIP loss plus CyCLIP's cyclic consistency terms (Goel et al. 2022).

    in-modal: ``||a a^T - b b^T||_F^2 / N``; cross-modal: ``||a b^T - b a^T||_F^2 / N``, with the paper's
    1/N normalisation (a sum over N^2 pairs divided by N, as in the reference code) for which the default
    lambda = 0.25 was tuned.
    """

    def __init__(self, gather: bool = True, lambda_inmodal: float = 0.25, lambda_crossmodal: float = 0.25):
        super().__init__(gather)
        self.lambda_inmodal = lambda_inmodal
        self.lambda_crossmodal = lambda_crossmodal

    def forward(
        self, a: Tensor, b: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``logit_bias`` is accepted for a uniform interface and unused."""
        a, b = self._gather(a, b)
        n = a.shape[0]
        clip = _clip_terms(a, b, logit_scale)["loss"]
        inmodal = (a @ a.T - b @ b.T).square().sum() / n
        cross = a @ b.T
        crossmodal = (cross - cross.T).square().sum() / n
        loss = clip + self.lambda_inmodal * inmodal + self.lambda_crossmodal * crossmodal
        return {"loss": loss, "clip": clip, "inmodal_cyclic": inmodal, "crossmodal_cyclic": crossmodal}


class SigLipLoss(_Loss):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023): ``-1/N sum_ij log sigmoid(z_ij (s <a_i,b_j> + c))``.

    ``z_ij`` is +1 on the diagonal and -1 elsewhere. The learnable bias ``c`` comes from the model
    (``ModelConfig.logit_bias``, e.g. -10, with ``init_logit_scale=log(10)`` as in the paper).
    """

    needs_logit_bias: ClassVar[bool] = True

    def forward(
        self, a: Tensor, b: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | None = None
    ) -> dict[str, Tensor]:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs logit_bias: set ModelConfig.logit_bias (e.g. -10)")
        a, b = self._gather(a, b)
        logits = logit_scale * a @ b.T + logit_bias
        signs = 2 * torch.eye(a.shape[0], device=a.device, dtype=logits.dtype) - 1
        return {"loss": -F.logsigmoid(signs * logits).sum() / a.shape[0]}


class ConVIRTLoss(_Loss):
    """ConVIRT's bidirectional InfoNCE (Zhang et al. 2020): ``lam * l(a->b) + (1 - lam) * l(b->a)``.

    Cosine similarities over a fixed temperature (0.1); ``a`` is the image, so ``lam=0.75`` weights
    image->text as in the paper. ``temperature=None`` uses the model's logit scale instead.
    """

    needs_logit_scale: ClassVar[bool] = False

    def __init__(self, gather: bool = True, temperature: float | None = 0.1, lam: float = 0.75):
        super().__init__(gather)
        self.temperature = temperature
        self.lam = lam

    def uses_logit_scale(self) -> bool:
        return self.temperature is None

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        logit_scale: Tensor | float | None = None,
        logit_bias: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``logit_bias`` is accepted for a uniform interface: a constant shift leaves softmax unchanged."""
        if self.temperature is None and logit_scale is None:
            raise ValueError("ConVIRTLoss(temperature=None) needs logit_scale")
        a, b = self._gather(a, b)
        scale = 1.0 / self.temperature if self.temperature is not None else logit_scale
        logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        labels = _labels(logits)
        a_to_b = F.cross_entropy(logits, labels)
        b_to_a = F.cross_entropy(logits.T, labels)
        return {"loss": self.lam * a_to_b + (1 - self.lam) * b_to_a, "a_to_b": a_to_b, "b_to_a": b_to_a}


class SimCSELoss(_Loss):
    """Unsupervised SimCSE (Gao et al. 2021): InfoNCE view1 -> view2 of the same sentences under dropout."""

    inputs: ClassVar[Inputs] = "text_views"
    needs_logit_scale: ClassVar[bool] = False

    def __init__(self, gather: bool = True, temperature: float = 0.05):
        super().__init__(gather)
        self.temperature = temperature

    def forward(self, view1: Tensor, view2: Tensor) -> dict[str, Tensor]:
        view1, view2 = self._gather(view1, view2)
        logits = F.normalize(view1, dim=-1) @ F.normalize(view2, dim=-1).T / self.temperature
        return {"loss": F.cross_entropy(logits, _labels(logits))}


class SupSimCSELoss(_Loss):
    """Supervised SimCSE: anchor vs [entailment positives ; contradiction hard negatives] over the batch."""

    inputs: ClassVar[Inputs] = "nli"
    needs_logit_scale: ClassVar[bool] = False

    def __init__(self, gather: bool = True, temperature: float = 0.05):
        super().__init__(gather)
        self.temperature = temperature

    def forward(self, anchor: Tensor, positive: Tensor, hard_negative: Tensor) -> dict[str, Tensor]:
        anchor, positive, hard_negative = self._gather(anchor, positive, hard_negative)
        candidates = F.normalize(torch.cat([positive, hard_negative]), dim=-1)
        logits = F.normalize(anchor, dim=-1) @ candidates.T / self.temperature
        return {"loss": F.cross_entropy(logits, _labels(logits))}


LOSSES: dict[str, type[_Loss]] = {
    "clip": ClipLoss,
    "multipos": MultiPositiveClipLoss,
    "structure": StructureLoss,
    "lightcrl": LightCRLLoss,
    "cyclip": CyClipLoss,
    "siglip": SigLipLoss,
    "convirt": ConVIRTLoss,
    "simcse": SimCSELoss,
    "simcse_sup": SupSimCSELoss,
    "supsimcse": SupSimCSELoss,  # alias
}

_INPUT_HINTS = {
    "pair": "paired embeddings a, b",
    "text_views": "text_views=(view1, view2), the same sentences encoded twice with dropout",
    "nli": "nli=(anchor, positive, hard_negative)",
}


class CombinedLoss(nn.Module):
    """Weighted sum of named losses; terms come back prefixed (``"clip/loss"``) with the total as ``"loss"``.

    Inputs are gathered across ranks once here (when ``gather``), so the member losses never gather.
    """

    def __init__(self, losses: Mapping[str, _Loss], weights: Mapping[str, float], gather: bool = True):
        super().__init__()
        if not losses:
            raise ValueError("CombinedLoss needs at least one loss")
        if set(losses) != set(weights):
            raise ValueError(f"losses {sorted(losses)} and weights {sorted(weights)} name different terms")
        self.losses = nn.ModuleDict(dict(losses))
        self.weights = {name: float(weights[name]) for name in losses}
        self.gather = gather
        for loss in self.losses.values():
            loss.gather = False

    def wants_frozen(self) -> bool:
        """Whether a member loss needs the frozen encoders' pooled features (``frozen=``)."""
        return any(getattr(loss, "wants_frozen", False) for loss in self.losses.values())

    def wants_groups(self) -> bool:
        """Whether a member loss needs the media item of every pair (``groups=``, multi-positive losses)."""
        return any(loss.wants_groups for loss in self.losses.values())

    def unpaired_sources(self) -> list:
        """Every member's unpaired sources (``structure: {unpaired: [...]}``), in member order."""
        return [src for loss in self.losses.values() for src in getattr(loss, "unpaired", [])]

    def required_inputs(self) -> set[str]:
        """What a call must provide: ``"pair"``, ``"text_views"``, ``"nli"``, ``"frozen"`` (the frozen
        encoders' pooled features), ``"groups"`` (the media item of every pair) and ``"unpaired"`` (items
        of :meth:`unpaired_sources`). The trainer prepares exactly this, never guessing from loss names.
        ``step=`` (the optimizer step, for ramped terms) is always passed by the trainer and needs no
        preparation."""
        needed = {loss.inputs for loss in self.losses.values()}
        needed |= {"frozen"} if self.wants_frozen() else set()
        needed |= {"unpaired"} if self.unpaired_sources() else set()
        return needed | ({"groups"} if self.wants_groups() else set())

    def forward(
        self,
        a: Tensor | None = None,
        b: Tensor | None = None,
        logit_scale: Tensor | float | None = None,
        logit_bias: Tensor | None = None,
        text_views: tuple[Tensor, Tensor] | None = None,
        nli: tuple[Tensor, Tensor, Tensor] | None = None,
        frozen: tuple[Tensor, Tensor] | None = None,
        groups: Tensor | None = None,
        step: int | None = None,
        unpaired: tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None] | None = None,
    ) -> dict[str, Tensor]:
        """``unpaired``: per side (a, b), the (frozen, aligned) unpaired items of the structure terms."""
        provided = {"pair": (a, b) if a is not None and b is not None else None, "text_views": text_views}
        provided["nli"] = nli
        for name, loss in self.losses.items():
            if provided[loss.inputs] is None:
                raise ValueError(f"loss {name!r} needs {_INPUT_HINTS[loss.inputs]}; none were passed")
            if loss.inputs == "pair" and logit_scale is None and loss.uses_logit_scale():
                raise ValueError(f"loss {name!r} needs logit_scale")
            if loss.needs_logit_bias and logit_bias is None:
                raise ValueError(f"loss {name!r} needs logit_bias: set ModelConfig.logit_bias (e.g. -10)")

        # Gather only what some loss uses, once, in a fixed order (not set order, which is hash-seeded per
        # process): every rank must make the same collective calls in the same sequence.
        gather = all_gather_with_grad if self.gather else _identity
        needed = self.required_inputs()
        inputs = {kind: tuple(gather(x) for x in provided[kind]) for kind in _INPUT_HINTS if kind in needed}
        if frozen is not None and self.wants_frozen():
            frozen = tuple(gather(x.detach()) for x in frozen)
        if groups is not None and self.wants_groups():
            groups = gather(groups)

        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, loss in self.losses.items():
            if loss.inputs == "pair":
                extra: dict[str, Any] = {}
                if loss.wants_frozen:
                    extra["frozen"] = frozen
                if loss.wants_groups:
                    extra["groups"] = groups
                if loss.wants_step:
                    extra["step"] = step
                if getattr(loss, "wants_unpaired", False):
                    extra["unpaired"] = unpaired
                terms = loss(*inputs["pair"], logit_scale, logit_bias, **extra)
            else:
                terms = loss(*inputs[loss.inputs])
            out.update({f"{name}/{key}": value for key, value in terms.items()})
            weighted = self.weights[name] * terms["loss"]
            total = weighted if total is None else total + weighted
        assert total is not None  # a CombinedLoss always holds at least one loss
        out["loss"] = total
        return out


def _identity(x: Tensor) -> Tensor:
    return x


def build_loss(spec: Mapping[str, float | Mapping[str, Any]], *, gather: bool = True) -> CombinedLoss:
    """Build a :class:`CombinedLoss` from ``{name: weight}`` or ``{name: {"weight": w, **options}}``.

    e.g. ``{"clip": 1.0}`` or ``{"lightcrl": 1.0, "simcse": {"weight": 0.5, "temperature": 0.05}}``.
    Names: see :data:`LOSSES`, optionally tagged ``name@tag`` to use one loss twice with other options
    (terms are then prefixed by the full key). Options are the loss's constructor arguments (``gather`` is
    set here, once for all).
    """
    if not spec:
        raise ValueError("empty loss spec; e.g. {'clip': 1.0}")
    losses: dict[str, _Loss] = {}
    weights: dict[str, float] = {}
    for name, value in spec.items():
        kind = name.split("@", 1)[0]
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
        if isinstance(value, Mapping):
            options = dict(value)
            weight = options.pop("weight", 1.0)
        else:
            options, weight = {}, value
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"loss {name!r}: weight must be a finite number, got {weight!r}")
        cls = LOSSES[kind]
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "gather"}
        unknown = set(options) - accepted
        if unknown:
            accepted_list = sorted(accepted | {"weight"})
            raise ValueError(f"loss {name!r}: unknown option(s) {sorted(unknown)}; accepted: {accepted_list}")
        losses[name] = cls(gather=False, **options)
        weights[name] = float(weight)
    return CombinedLoss(losses, weights, gather=gather)
