"""The trainer: only the projections, context vectors, DFE and temperature learn, on cached features.

``train(cfg, run_dir)`` builds (or reuses) every feature store it needs through the store cache, then
trains with AdamW, warmup + cosine (or plateau) schedule, gradient clipping, validation retrieval every
epoch, early stopping, best/last checkpoints and exact resume. Under torchrun each rank reads its chunk
of every global batch and the losses all-gather embeddings with gradients (OpenCLIP semantics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from lightcrl import distributed as dist
from lightcrl.anchors import build_anchor_set
from lightcrl.api import encode_store
from lightcrl.app.config import TrainConfig, dump_config
from lightcrl.app.train_data import (
    NliBatches,
    UnpairedBatches,
    build_pairsets,
    epoch_schedule,
    feature_adapter,
    input_dims,
    steps_per_epoch,
)
from lightcrl.app.train_log import RunLog
from lightcrl.canonical import fit_pairs
from lightcrl.checkpoint import (
    checkpoint_folder,
    load_checkpoint,
    publish_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from lightcrl.devices import autocast, autocast_dtype, cpu_has_amx, resolve_device
from lightcrl.errors import LightCRLError
from lightcrl.hubness import bank_rows
from lightcrl.io import write_json, write_text
from lightcrl.losses import ClipLoss, build_loss
from lightcrl.mixing import fusemix, mixed_groups, sample_fusemix
from lightcrl.model import ModelConfig, create_model
from lightcrl.pairs import PairSet, epoch_batches, rank_slice
from lightcrl.rundir import RunDir
from lightcrl.version import __version__

log = logging.getLogger(__name__)


# -- schedule ---------------------------------------------------------------------------------------
def lr_lambda(step: int, warmup: int, total: int, min_ratio: float, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule != "cosine":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, context vectors and the temperature (OpenCLIP's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit" in name or "context" in name or "norm" in name else decay).append(
            p
        )
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- evaluation during training ------------------------------------------------------------------------
@torch.no_grad()
def validate(model, sets: list[PairSet], device, batch_size: int, seed: int) -> dict[str, float]:
    from lightcrl.metrics import retrieval

    raw = model.module if hasattr(model, "module") else model
    metrics: dict[str, float] = {}
    losses, r1s = [], []
    clip = ClipLoss(gather=False)
    for s in sets:
        # the pair set's own media and captions only (it may be a held-out part of its stores)
        media_rows = np.unique(s.media_index)
        pair_media = np.searchsorted(media_rows, s.media_index)  # pair -> row of media_emb
        media_emb = encode_store(raw, s.adapter, s.media, device, indices=media_rows)
        text_emb = encode_store(raw, s.adapter, s.text, device, indices=s.text_index)  # row = pair
        offsets = getattr(raw, "retrieval_offsets", lambda *_: None)  # model.hubness: CSLS, else None
        image_off, text_off = offsets(media_emb, "text"), offsets(text_emb, s.media_modality)
        r = retrieval.evaluate(media_emb, text_emb, pair_media, image_offsets=image_off,
                               text_offsets=text_off)
        prefix = f"val/{s.name}/" if len(sets) > 1 else "val/"
        if image_off is not None or text_off is not None:  # the plain cosine's too, to see what it changed
            plain = retrieval.evaluate(media_emb, text_emb, pair_media)
            for k in ("image_retrieval_recall@1", "text_retrieval_recall@1"):
                metrics[f"{prefix}uncorrected/{k}"] = float(plain[k])
        for k in (
            "image_retrieval_recall@1",
            "text_retrieval_recall@1",
            "image_retrieval_recall@5",
            "text_retrieval_recall@5",
        ):
            metrics[prefix + k] = float(r[k])
        r1s.append((r["image_retrieval_recall@1"] + r["text_retrieval_recall@1"]) / 2)
        if len(sets) > 1:  # each source's own, so a selection metric can name one source's retrieval
            metrics[prefix + "mean_recall@1"] = r1s[-1]
        if s.media.classnames and (s.media.items.labels[media_rows] >= 0).all():
            # captions made from class names: zero-shot top-1 of the media, classifier = each class's
            # unique captions (its templates), as lightcrl.metrics.zeroshot builds it
            metrics[prefix + "zeroshot_top1"] = _caption_zeroshot(s, media_rows, pair_media, media_emb,
                                                                  text_emb, raw)
        # val loss: symmetric InfoNCE at the current temperature on fixed random-caption batches
        pairs = s.epoch_pairs(seed, 10**6, "random_caption")  # a fixed epoch id never trained on
        scale = raw.get_logit_scale().detach()
        me, te = torch.from_numpy(media_emb), torch.from_numpy(text_emb)
        for sl in epoch_batches(len(pairs), batch_size):
            p = pairs[sl]
            out = clip(me[pair_media[p]], te[p], scale.cpu().float())
            losses.append(float(out["loss"]))
    metrics["val/loss"] = float(np.mean(losses)) if losses else float("nan")
    metrics["val/mean_recall@1"] = float(np.mean(r1s))
    return metrics


# Options added after runs existed, left out of the fingerprint at their defaults so those runs resume.
_NEW_DEFAULTS = {"data": {"captions_per_media": None, "fusemix": None},
                 "model": {"head": "plain", "locked": [], "ridge": None, "hubness": None},
                 "optim": {"precision": "auto"}}


def _without_new_defaults(dump: dict) -> dict:
    out = dict(dump)
    if isinstance(out.get("data"), dict) and isinstance(out["data"].get("sources"), list):
        out["data"] = dict(out["data"], sources=[
            {k: v for k, v in src.items() if not (k in ("holdout", "val_spec") and v is None)}
            for src in out["data"]["sources"]
        ])
    for section, defaults in _NEW_DEFAULTS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if not (k in defaults and v == defaults[k])}
    return out


def _caption_zeroshot(s: PairSet, media_rows: np.ndarray, pair_media: np.ndarray, media_emb: np.ndarray,
                      text_emb: np.ndarray, model=None) -> float:
    """Top-1 (%) of classifying each media item by the mean embedding of each class's distinct captions.

    ``media_emb`` rows are the store rows ``media_rows``; ``text_emb`` rows are the pairs."""
    labels = s.media.items.labels[media_rows]
    by_class: dict[int, dict[str, int]] = {}
    for p, (row, ti) in enumerate(zip(pair_media.tolist(), s.text_index.tolist())):
        by_class.setdefault(int(labels[row]), {}).setdefault(s.text.items.texts[ti], p)
    classes = sorted(by_class)
    weights = np.stack([text_emb[list(by_class[c].values())].mean(0) for c in classes])
    weights /= np.linalg.norm(weights, axis=1, keepdims=True).clip(1e-12)
    scores = media_emb @ weights.T
    bias = model.zeroshot_bias(weights, s.media_modality) if hasattr(model, "zeroshot_bias") else None
    if bias is not None:  # e.g. arch ridge's hubness correction (csls)
        scores = scores + bias
    pred = np.asarray(classes)[np.argmax(scores, axis=1)]
    return float(100.0 * np.mean(pred == labels))


# -- the trainer ------------------------------------------------------------------------------------
# Where the current epoch stands, beside state["batch"]: a mid-epoch checkpoint saves them, so the epoch's
# time/epoch_s and time/pairs_per_s count the steps done before the kill.
_EPOCH_PROGRESS = ("epoch_pairs", "epoch_time_s")


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, overwrite: bool = False):
        self.cfg = cfg
        self.run = RunDir(run_dir)
        self.run_dir = self.run.path
        self.rank, self.world, self.local_rank, dev = dist.init_distributed()
        self.device = dev if self.world > 1 else resolve_device(cfg.device)
        autocast_dtype(self.device, cfg.optim.precision)  # fp16 on a CPU: one clear error before any work
        self.is_main = self.rank == 0
        sgd = cfg.model.get("arch") != "ridge"  # a closed-form fit has no training step to speed up
        cpu_auto = self.device.type == "cpu" and cfg.optim.precision == "auto"
        if self.is_main and sgd and cpu_auto and cpu_has_amx():
            log.info("this CPU has AMX bf16: --set optim.precision=bf16 trains ~1.5x faster a step "
                     "(docs/benchmarks.md); auto stays float32 on CPUs")
        torch.manual_seed(cfg.seed)

        self.train_sets = build_pairsets(cfg, "train", self.rank, self.world)
        # validation runs on rank 0 alone, so its stores are built without the cross-rank barriers
        self.val_sets = build_pairsets(cfg, "val") if self.is_main else []
        self.dims = input_dims(self.train_sets)
        self.anchor_set, model_cfg = self._build_anchors()
        canonical_fit, model_cfg = self._fit_canonical(model_cfg)
        torch.manual_seed(cfg.seed)  # here, not earlier: building stores may consume the global RNG
        self.model = create_model(model_cfg, self.dims).to(self.device)
        if self.anchor_set is not None:
            self.model.anchors.set_keys(self.anchor_set.keys)
        if canonical_fit is not None:
            self.model.canonical.set_fit(canonical_fit, self.train_sets[0].media_modality)
        self.loss_fn = build_loss(cfg.loss)
        self.loss_inputs = self.loss_fn.required_inputs()  # the loss says what each step must provide
        self.nli = None
        if "nli" in self.loss_inputs:
            needed_by = [n for n, loss in self.loss_fn.losses.items() if loss.inputs == "nli"]
            self.nli = NliBatches(cfg, needed_by, self.rank, self.world)
        self.unpaired = None
        if "unpaired" in self.loss_inputs:
            self.unpaired = UnpairedBatches(cfg, self.loss_fn.unpaired_sources(), self.train_sets, self.dims,
                                            self.rank, self.world)
        self.fingerprint = self._fingerprint()

        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            # one kernel per parameter instead of ~7 elementwise passes (a run resumed from a checkpoint of
            # the unfused optimizer keeps its setting); same update up to float rounding
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.steps_per_epoch = steps_per_epoch(cfg, self.train_sets)
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda st: lr_lambda(st, o.warmup_steps, self.total_steps, o.min_lr_ratio, o.schedule),
        )
        self.plateau_scale = 1.0
        self.plateau_bad = 0
        self.ddp_model = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.local_rank] if self.device.type == "cuda" else None
            )
        self.state = {
            "epoch": 0,
            "batch": 0,
            "step": 0,
            "train_time_s": 0.0,  # cumulative over resumed calls
            "best": None,
            "best_epoch": None,
            "bad_epochs": 0,
            "history": [],
            "fingerprint": self.fingerprint,
        }
        self.run_log = RunLog(self.run, tensorboard=cfg.tensorboard, enabled=self.is_main)
        if self.is_main:
            self._prepare_run_dir(overwrite)

    def _nli_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's NLI triplets encoded through the trainable text path."""
        return tuple(self.model.encode("text", t.to(self.device), m.to(self.device))
                     for t, m in self.nli.inputs(self.state["step"]))

    def _unpaired_batch(self, media: str):
        """This step's unpaired items: per side of the pair (media, text), None or (frozen pooled features,
        embeddings through the trainable path), the sources of one modality concatenated."""
        sides: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
        for modality, tokens, mask in self.unpaired.inputs(self.state["step"]):
            side = 0 if modality == media else 1 if modality == "text" else None
            if side is None:  # another pair's modality (multi-source runs): not in this batch's walks
                continue
            tokens, mask = tokens.to(self.device), mask.to(self.device)
            frozen = self.train_sets[0].adapter.frozen_pooled(tokens, mask)
            sides[side].append((frozen, self.model.encode(modality, tokens, mask)))
        return tuple((torch.cat([f for f, _ in s]), torch.cat([z for _, z in s])) if s else None
                     for s in sides)

    def _first_pairs(self, part: str) -> PairSet:
        """The first training source, which a model part built from training pairs (``part``) uses; it
        must cover every modality of the run."""
        s = self.train_sets[0]
        missing = sorted(set(self.dims) - {s.media_modality, "text"})
        if missing:
            raise LightCRLError(
                f"{part} is built from the first training source ({s.name}: {s.media_modality}-text), "
                f"which has no {missing} pairs: drop {part} for multi-modality runs"
            )
        return s

    def _refresh_hubness_bank(self) -> None:
        """model.hubness: embed a seeded sample of the TRAINING items (never a held-out one) with the current
        weights, so a checkpoint's bank always matches its weights."""
        raw = self.model.module if hasattr(self.model, "module") else self.model
        hcfg = getattr(raw.cfg, "hubness", None)
        if hcfg is None or not self.is_main:
            return
        was_training = raw.training
        raw.eval()
        per_modality: dict[str, list[np.ndarray]] = {}
        for i, s in enumerate(self.train_sets):
            for store, rows in ((s.media, s.media_index), (s.text, s.text_index)):
                picked = bank_rows(rows, hcfg.bank, self.cfg.seed * 1009 + i)
                emb = encode_store(raw, s.adapter, store, self.device, indices=picked)
                per_modality.setdefault(store.modality, []).append(emb)
        bank = {}
        for m, parts in per_modality.items():
            emb = np.concatenate(parts)
            bank[m] = emb[bank_rows(np.arange(len(emb)), hcfg.bank, self.cfg.seed)]
        raw.set_hubness_bank(bank)
        raw.train(was_training)

    def _fit_canonical(self, model_cfg: ModelConfig):
        """model.csa: CCA of the first training source's pairs; the model config gets the rank used."""
        ccfg = model_cfg.csa
        if ccfg is None:
            return None, model_cfg
        fit = fit_pairs(self._first_pairs("model.csa"), ccfg.reg)
        model_cfg.csa = ccfg.model_copy(update={"rank": min(ccfg.dims, fit.rank)})
        return fit, model_cfg

    def _build_anchors(self):
        """model.anchors: anchor pairs from the first training source; the model config gets their count."""
        model_cfg = ModelConfig.model_validate(self.cfg.model)
        acfg = model_cfg.anchors
        if acfg is None:
            return None, model_cfg
        s = self._first_pairs("model.anchors")
        anchor_set = build_anchor_set(s, acfg.max_anchors, self.cfg.seed)
        model_cfg.anchors = acfg.model_copy(update={"count": len(anchor_set)})
        return anchor_set, model_cfg

    # ---------------------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(
            json.dumps(
                # the checkpoint interval changes no number: a run may resume with another one
                _without_new_defaults(self.cfg.model_dump(
                    mode="json",
                    exclude={"progress": True, "name": True, "optim": {"checkpoint_every_steps": True}},
                )),
                sort_keys=True,
            ).encode()
        )
        for s in self.train_sets:
            h.update(s.media.fingerprint.encode() + s.text.fingerprint.encode())
        if self.nli is not None:
            h.update(self.nli.store.fingerprint.encode())
        return h.hexdigest()

    def _prepare_run_dir(self, overwrite: bool):
        run = self.run
        if overwrite and run.path.exists():
            for folder in (run.checkpoints, run.tensorboard):
                shutil.rmtree(folder, ignore_errors=True)
            for f in (run.metrics, run.weights, run.model_info):
                f.unlink(missing_ok=True)
        run.path.mkdir(parents=True, exist_ok=True)
        write_text(run.config, dump_config(self.cfg))

    def model_info(self) -> dict:
        sources = []
        for s in self.train_sets:
            sources.append(
                {
                    "name": s.name,
                    "media_store": s.media.summary(),
                    "text_store": s.text.summary(),
                    "pairs": len(s),
                }
            )
        encoders = {}
        for src in self.cfg.data.sources:
            media_mod = next(
                s.media_modality
                for s in self.train_sets
                if s.media.manifest["encoder"]["name"] == src.media_encoder
            )
            encoders[media_mod] = src.media_encoder
            encoders["text"] = src.text_encoder
        return {
            "kind": "lightcrl",
            "lightcrl_version": __version__,
            "model_config": self.model.cfg.model_dump() if hasattr(self.model, "cfg") else self.cfg.model,
            "input_dims": self.dims,
            "encoders": encoders,
            **feature_adapter(self.cfg).describe(),
            "parameter_counts": self.model.parameter_counts(),
            "train_sources": sources,
            "fingerprint": self.fingerprint,
        }

    # ---------------------------------------------------------------------------------------------
    def resume(self) -> bool:
        folder = checkpoint_folder(self.run_dir, "last")
        if folder is None:
            return False
        ck = load_checkpoint(folder, expected_fingerprint=self.fingerprint)
        self.model.load_state_dict(ck["model"])
        st = ck["state"]
        self.optimizer.load_state_dict(unflatten_optimizer(ck["trainer"], st["optimizer"]))
        self.scheduler.load_state_dict(st["scheduler"])
        self.plateau_scale = st.get("plateau_scale", 1.0)
        self.plateau_bad = st.get("plateau_bad", 0)
        torch.set_rng_state(ck["trainer"]["rng.torch"])
        # the GPU's dropout RNG: a checkpoint taken mid-epoch continues from it (at an epoch start it is
        # reseeded anyway)
        cuda_keys = [f"rng.cuda.{i}" for i in range(torch.cuda.device_count())]
        if cuda_keys and all(k in ck["trainer"] for k in cuda_keys):
            torch.cuda.set_rng_state_all([ck["trainer"][k] for k in cuda_keys])
        self.state.update({k: st[k] for k in (*self.state, *_EPOCH_PROGRESS) if k in st})
        self.run_log.rewind(st["step"])
        if self.is_main:
            log.info("resumed from %s (epoch %d, step %d)", folder, st["epoch"], st["step"])
        return True

    def _save(self, tag: str):
        if not self.is_main:
            return
        st = dict(
            self.state,
            scheduler=self.scheduler.state_dict(),
            plateau_scale=self.plateau_scale,
            plateau_bad=self.plateau_bad,
        )
        save_checkpoint(self.run_dir, tag, self.model, st, self.optimizer if tag == "last" else None)

    def _publish(self, tag: str):
        """Checkpoint ``tag`` becomes <run>/model.safetensors + model.json (what lightcrl.load reads)."""
        if self.is_main:
            publish_checkpoint(self.run_dir, tag, dict(self.model_info(), epoch=self.state["epoch"]))

    # ---------------------------------------------------------------------------------------------
    def train_step(self, si: int, batch: np.ndarray) -> dict[str, float]:
        s = self.train_sets[si]
        media = s.media_modality
        local = rank_slice(batch, self.rank, self.world)
        inputs = s.batch(local, self.device)
        needs = self.loss_inputs
        # the media item of every pair: positives of multi-positive losses
        groups = torch.as_tensor(s.media_index[local], device=self.device) if "groups" in needs else None
        if self.cfg.data.fusemix is not None:  # FuseMix: the same mix of frozen inputs in both modalities
            lam, perm = sample_fusemix(len(local), self.cfg.data.fusemix.alpha)
            inputs = fusemix(inputs, lam, perm)
            if groups is not None:
                groups = mixed_groups(groups, torch.as_tensor(local), lam, perm)
        self.ddp_model.train()
        exclude = None
        if self.anchor_set is not None and si == 0:  # leave-one-out: never see your own anchor
            exclude = self.anchor_set.exclude(s.media_index[local]).to(self.device)
        with autocast(self.device, precision=self.cfg.optim.precision):
            out = self.ddp_model(inputs, exclude) if exclude is not None else self.ddp_model(inputs)
            extra = {}
            if "text_views" in needs:  # the same captions again under other dropout (unsupervised SimCSE)
                extra["text_views"] = (out["text"], self.model.encode("text", *inputs["text"], exclude))
            if "nli" in needs:
                extra["nli"] = self._nli_batch()
            if "frozen" in needs:
                extra["frozen"] = tuple(s.adapter.frozen_pooled(*inputs[m]) for m in (media, "text"))
            if groups is not None:
                extra["groups"] = groups
            if self.unpaired is not None:
                extra["unpaired"] = self._unpaired_batch(media)
            losses = self.loss_fn(out[media], out["text"], out["logit_scale"], out.get("logit_bias"),
                                  step=self.state["step"], **extra)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise LightCRLError(
                f"non-finite loss ({float(loss.detach())}) at epoch {self.state['epoch'] + 1} "
                f"step {self.state['step'] + 1} (numbered as in metrics.jsonl): training stopped; the last "
                "good checkpoint is kept in "
                f"{self.run.checkpoints}. "
                "Try a lower optim.lr or optim.grad_clip."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = None
        if self.cfg.optim.grad_clip:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        if hasattr(self.model, "clamp_logit_scale_"):
            self.model.clamp_logit_scale_()
        row = {f"train/{k}": float(v.detach()) for k, v in losses.items()}
        row["train/logit_scale"] = float(out["logit_scale"].detach())
        row["train/lr"] = self.optimizer.param_groups[0]["lr"]
        if gnorm is not None:
            row["train/grad_norm"] = gnorm
        return row

    @torch.no_grad()
    def _fit_ridge(self, lam: float) -> None:
        """arch ridge: fit every media modality's map in closed form (penalty ``lam``), on all training pairs.

        Each media item's target is the normalised mean of its captions' target-space embeddings (for
        captions made from class names: its class's prompt embedding), minus the training targets' mean
        with ``center``. Features (``ridge.pool`` of the frozen tokens) are standardised with the training
        items' mean and spread, and ``W = argmin |X W - T|^2 + lam * n * |W|^2``; the model keeps
        ``diag(1/sd) W`` and the mean, so ``encode`` needs no other state."""
        model, rcfg = self.model, self.model.cfg.ridge
        target = rcfg.target
        feats: dict[str, list] = {}
        targets: dict[str, list] = {}
        model.get_buffer(f"ridge_mean_{target}").zero_()
        for s in self.train_sets:
            if s.media_modality == target:
                raise LightCRLError(f"arch ridge: the pairs {s.name} have no modality besides {target}")
            media_rows, pair_media = np.unique(s.media_index, return_inverse=True)
            text = encode_store(model, s.adapter, s.text, self.device, indices=s.text_index)  # row = pair
            t = np.zeros((len(media_rows), text.shape[1]), np.float64)
            np.add.at(t, pair_media, text)  # every caption of the item
            t /= np.linalg.norm(t, axis=1, keepdims=True).clip(1e-12)
            x = []
            for i in range(0, len(media_rows), 512):
                tok, mask = s.adapter.from_store(s.media, media_rows[i : i + 512])
                x.append(model.ridge_features(tok.float(), mask).double().cpu().numpy())
            feats.setdefault(s.media_modality, []).append(np.concatenate(x))
            targets.setdefault(s.media_modality, []).append(t)
        centre = np.concatenate([t for ts in targets.values() for t in ts]).mean(0) if rcfg.center else 0.0
        for m in feats:
            X, T = np.concatenate(feats[m]), np.concatenate(targets[m]) - centre
            T /= np.linalg.norm(T, axis=1, keepdims=True).clip(1e-12)
            mu, sd = X.mean(0), X.std(0) + 1e-6
            U, S, Vt = np.linalg.svd((X - mu) / sd, full_matrices=False)
            W = Vt.T @ ((S / (S**2 + lam * len(X)))[:, None] * (U.T @ T))
            model.get_buffer(f"ridge_mean_{m}").copy_(torch.from_numpy(mu))
            model.get_buffer(f"ridge_map_{m}").copy_(torch.from_numpy(W / sd[:, None]))
            hub = ((X - mu) / sd) @ W if rcfg.csls else np.zeros((0, W.shape[1]))
            hub /= np.linalg.norm(hub, axis=1, keepdims=True).clip(1e-12) if len(hub) else 1.0
            setattr(model, f"ridge_hub_{m}", torch.from_numpy(hub).float().to(self.device))
        model.get_buffer(f"ridge_mean_{target}").copy_(torch.as_tensor(centre, dtype=torch.float32))

    def _apply_plateau(self, metric: float | None):
        if self.cfg.optim.schedule != "plateau" or metric is None:
            return
        better = self.state["best"] is None or self._improved(metric, self.state["best"])
        self.plateau_bad = 0 if better else self.plateau_bad + 1
        if self.plateau_bad > self.cfg.optim.plateau_patience:
            self.plateau_scale *= self.cfg.optim.plateau_factor
            self.plateau_bad = 0
        # LambdaLR multiplies base_lrs by the warmup factor; plateau decay rescales the base.
        self.scheduler.base_lrs = [self.cfg.optim.lr * self.plateau_scale for _ in self.scheduler.base_lrs]

    def _improved(self, value: float, best: float) -> bool:
        return value > best if self.cfg.early_stop.direction == "max" else value < best

    def fit(self, stop_after_epoch: int | None = None) -> dict:
        """Train to cfg.optim.epochs (or pause after ``stop_after_epoch``; rerun to continue)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        resumed = self.resume()
        if self.is_main and not resumed:
            self.run_log.start_fresh()
            self.run.write_info(self.model_info(), started=True)
            self._refresh_hubness_bank()
            if self.val_sets and cfg.eval_every:
                row = {
                    "step": 0,
                    "epoch": 0,
                    **validate(self.model, self.val_sets, self.device, cfg.optim.batch_size, cfg.seed),
                }
                self.run_log.log(row)
        stopped_early = False
        ridge = self.model.cfg.ridge if self.model.cfg.arch == "ridge" else None
        n_epochs = len(ridge.lams) if ridge is not None else cfg.optim.epochs
        while self.state["epoch"] < n_epochs:
            epoch = self.state["epoch"]
            if self.state["batch"] == 0:
                # Dropout RNG is a function of (seed, epoch): a resumed epoch replays exactly. A resume in
                # the middle of an epoch goes on from the RNG state saved at that step (see resume()).
                torch.manual_seed(cfg.seed * 100003 + epoch)
                self.state.update(epoch_pairs=0, epoch_time_s=0.0)
            t_fit = time.time()
            if ridge is not None:  # no steps: this "epoch" is the closed-form fit with its penalty
                self._fit_ridge(ridge.lams[epoch])
                schedule = []
            else:
                schedule = epoch_schedule(cfg, self.train_sets, epoch)  # resumed at state["batch"]
            bar = tqdm(
                total=len(schedule),
                initial=self.state["batch"],
                desc=f"epoch {epoch + 1}/{n_epochs}",
                disable=not (cfg.progress and self.is_main) or not schedule,  # a ridge fit has no steps
                dynamic_ncols=True,
                leave=False,
            )
            t0, time_before = t_fit, self.state["epoch_time_s"]
            every = cfg.optim.checkpoint_every_steps
            losses = []  # this process's steps of the epoch, for its log line
            for j in range(self.state["batch"], len(schedule)):
                si, batch = schedule[j]
                row = self.train_step(si, batch)
                losses.append(row["train/loss"])
                self.state["epoch_pairs"] += len(batch)
                self.state["step"] += 1
                self.state["batch"] = j + 1
                bar.update(1)
                bar.set_postfix(loss=f"{row['train/loss']:.3f}", scale=f"{row['train/logit_scale']:.1f}")
                if self.state["step"] % cfg.log_every == 0 or j == len(schedule) - 1:
                    progress = epoch + (j + 1) / len(schedule)
                    self.run_log.log({"step": self.state["step"], "epoch": progress, **row})
                # (the epoch's last step is saved below anyway, after validation)
                if every and self.state["step"] % every == 0 and j < len(schedule) - 1:
                    self.state["epoch_time_s"] = time_before + time.time() - t0
                    self._save("last")
            bar.close()
            epoch_time = time_before + time.time() - t0
            self.state["train_time_s"] += epoch_time
            self.state["epoch"] = epoch + 1
            self.state["batch"] = 0
            self._refresh_hubness_bank()  # before validation and the epoch's checkpoints
            row = {
                "step": self.state["step"],
                "epoch": epoch + 1,
                "time/epoch_s": epoch_time,
                "time/pairs_per_s": self.state["epoch_pairs"] / max(epoch_time, 1e-9),
            }
            if ridge is not None:
                row["ridge/lam"] = ridge.lams[epoch]
            metric = None
            if self.is_main and self.val_sets and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
                row.update(validate(self.model, self.val_sets, self.device, cfg.optim.batch_size, cfg.seed))
                metric = cfg.early_stop.value(row)
                if metric is None:
                    missing = [m for m in cfg.early_stop.metrics if m not in row]
                    raise LightCRLError(
                        f"early_stop.metric {', '.join(map(repr, missing))} is not computed; "
                        f"available: {', '.join(k for k in row if k.startswith('val/'))}"
                    )
                if len(cfg.early_stop.metrics) > 1:
                    row["val/selection"] = metric  # the mean that picks the epoch, logged beside its parts
            self._apply_plateau(metric)
            self.run_log.log(row)
            if self.is_main:
                chosen_by = None if metric is None else (cfg.early_stop.name, metric)
                log.info(epoch_line(row, n_epochs, losses, chosen_by))
            if metric is not None:
                if self.state["best"] is None or self._improved(metric, self.state["best"]):
                    self.state.update(best=metric, best_epoch=epoch + 1, bad_epochs=0)
                    self._save("best")
                    self._publish("best")
                else:
                    self.state["bad_epochs"] += 1
            self.state["history"].append(
                {k: v for k, v in row.items() if k.startswith("val/") or k == "epoch"}
            )
            self._save("last")
            if not self.val_sets:
                self._publish("last")
            pat = cfg.early_stop.patience
            stop = pat is not None and self.state["bad_epochs"] >= pat
            if self.world > 1:
                flag = torch.tensor([int(stop)], device=self.device)
                torch.distributed.broadcast(flag, 0)
                stop = bool(flag.item())
            if stop:
                stopped_early = True
                break
            if stop_after_epoch is not None and self.state["epoch"] >= stop_after_epoch:
                break
        summary = {
            "epochs": self.state["epoch"],
            "steps": self.state["step"],
            "best": self.state["best"],
            "best_epoch": self.state["best_epoch"],
            "stopped_early": stopped_early,
            "train_time_s": self.state["train_time_s"],
            "metric": cfg.early_stop.name,
        }
        if self.is_main:
            if checkpoint_folder(self.run_dir, "best") is None:
                self._publish("last")
            write_json(self.run.train_summary, summary)
        self.run_log.close()
        return summary


def epoch_line(row: dict, n_epochs: int, losses: list[float], selection: tuple[str, float] | None) -> str:
    """One epoch's log line (the record is metrics.jsonl): a run with ``progress: false`` still says how it
    goes, e.g. ``epoch 2/3: 69.0 s, 87 pairs/s, loss 0.819 (mean of 47 steps); val/mean_recall@1 30.12``."""
    text = f"epoch {row['epoch']}/{n_epochs}: {row['time/epoch_s']:.1f} s"
    if losses:  # (arch ridge fits in closed form: no steps)
        text += (f", {row['time/pairs_per_s']:.0f} pairs/s, loss {sum(losses) / len(losses):.3f} "
                 f"(mean of {len(losses)} steps)")
    if selection is not None:  # the metric that picks the epoch
        text += f"; {selection[0]} {selection[1]:.2f}"
    return text


def train(
    cfg: TrainConfig, run_dir: str | Path, overwrite: bool = False, stop_after_epoch: int | None = None
) -> dict:
    trainer = Trainer(cfg, run_dir, overwrite=overwrite)
    try:
        return trainer.fit(stop_after_epoch)
    finally:
        dist.cleanup()
