"""Locked-text side study for the class-disjoint audio protocol (docs/audio.md, "Results").

    .venv/bin/python benchmarks/audio_locked_text.py [--data ../shared/data] [--study levers|grid|supervised]

The text side is the frozen MiniLM space itself (no trained text head). On aiSFX's pooled, standardised
clip features, per class-disjoint fold (the protocol's folds: train on 3 class groups, choose on the
validation group g+1, test 10-way on group g; lightcrl.app.protocols.class_disjoint_folds's groups):

- ``linear`` / ``mlp``: a linear map (or a 1-hidden-layer MLP) into MiniLM's 384-d space, trained with a
  softmax over the training classes' prompt embeddings at temperature ``tau``; the epoch (every 5, up to
  60) is chosen on validation;
- ``ridge``: the closed-form least-squares map onto each clip's class prompt embedding (ridge ``lam``);
  ``ridge-centred``: the same onto class embeddings minus the training classes' mean (what all prompts
  share), renormalised; test class embeddings are centred with the same training mean;
- ``relative``: relative representations against text anchors (the training classes' prompt
  embeddings): a softmax classifier over the training classes gives each clip a distribution over them;
  a class name is represented by its softmax similarity (temperature 0.05) to the same anchors; a clip
  takes the class whose representation is closest (cosine). ``conse``: the clip is instead embedded as
  the probability-weighted mean of the anchors' text embeddings (ConSE, Norouzi et al. 2014) and takes
  the nearest class embedding. Nothing is trained on text.

Class embeddings: mean of the normalised MiniLM embeddings of a prompt set: ``t6`` (the 6 audio
templates), ``many`` (20 templates), ``desc`` (5 class descriptions, esc50_descriptions.json), ``desc+many``
(both lists). ``--study levers`` (default) runs every head on every prompt set with a small grid of its
hyper-parameters, chooses on the mean validation top-1 over the 5 folds, and prints one row per
(head, prompts) cell with the chosen setting; ``grid`` prints every setting; ``supervised`` the
supervised-via-captions reference (folds 1-3 train, 4 validates, 5 tests, 50-way). Reads the cached
ESC-50 aiSFX store (extracted on first use). Seed ``--seed`` (torch init and batch order).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lightcrl.data.datasets import _resource_lines, class_groups
from lightcrl.embed import EmbedOptions, cached_store
from lightcrl.encoders import get_encoder

torch.set_num_threads(1)
_p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_p.add_argument("--data", default="../shared/data")
_p.add_argument("--study", choices=["levers", "grid", "supervised"], default="levers")
_p.add_argument("--heads", default="ridge,linear,relative,conse")
_p.add_argument("--prompts", default="t6,desc,desc+many")
_p.add_argument("--seed", type=int, default=0)
_p.add_argument("--transfer", action="store_true", help="the transfer split (-> ESC-10), not the 5 folds")
_p.add_argument("--json", help="also write the rows here")
ARGS = _p.parse_args()
E = f"esc50:{Path(ARGS.data) / 'esc50'}"
st = cached_store("aisfx", E, "all", EmbedOptions(progress=False))
X = st.pooled().astype(np.float32)
y = st.items.labels
names = st.classnames
enc = get_encoder("minilm-l6", device="cpu")


def embed_texts(texts):
    out = []
    for i in range(0, len(texts), 64):
        b = enc.collate([enc.transform(t) for t in texts[i : i + 64]])
        out.append(enc.encode_batch(b).pooled.numpy())
    z = np.concatenate(out)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def class_emb(prompts_per_class):
    flat = [p for ps in prompts_per_class for p in ps]
    z = embed_texts(flat)
    out, i = [], 0
    for ps in prompts_per_class:
        m = z[i : i + len(ps)].mean(0)
        out.append(m / np.linalg.norm(m))
        i += len(ps)
    return np.stack(out).astype(np.float32)


_RES = Path(__file__).resolve().parents[1] / "src/lightcrl/resources/templates"
DESC = json.loads((_RES / "esc50_descriptions.json").read_text())
PROMPTS = {
    "t6": lambda n: [t.replace("{c}", n) for t in _resource_lines("audio_templates.txt")],
    "many": lambda n: [t.replace("{c}", n) for t in _resource_lines("audio_templates_many.txt")],
    "desc": lambda n: DESC[n],
    "desc+many": lambda n: DESC[n] + PROMPTS["many"](n),
}
_CACHE: dict = {}


def C(pname):
    if pname not in _CACHE:
        _CACHE[pname] = class_emb([PROMPTS[pname](n) for n in names])
    return _CACHE[pname]


mu, sd = X.mean(0), X.std(0) + 1e-6
Xn = ((X - mu) / sd).astype(np.float32)
groups = class_groups(50)
# (training, validation, test) classes of the 5 class-disjoint folds: test group g, validate on g + 1
FOLDS = [([c for k in range(5) if k not in (g, (g + 1) % 5) for c in groups[k]], groups[(g + 1) % 5],
          groups[g]) for g in range(5)]


def transfer_fold():
    """ESC-50 without ESC-10's classes: group 0 (of 5, seed 0) of the 40 validates, the other 32 train;
    the test is ESC-10's 10 classes (the protocol's transfer split, lightcrl.app.protocols)."""
    from lightcrl.data.datasets import open_dataset

    esc10 = set(open_dataset(E + "?esc10=1", "all").classnames)
    rest = [i for i, n in enumerate(names) if n not in esc10]
    val = [rest[i] for i in class_groups(len(rest))[0]]
    return [c for c in rest if c not in val], val, [i for i, n in enumerate(names) if n in esc10]


def _acc(scores, classes):
    m = np.isin(y, classes)
    return 100 * float(np.mean(np.asarray(classes)[scores(Xn[m], classes).argmax(1)] == y[m]))


def _sgd(model, Xt, yt, epochs, lr, wd, step_loss, every=5, evaluate=None):
    torch.manual_seed(ARGS.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    res = []
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(Xt))
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            loss = step_loss(model(Xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep % every == every - 1:
            model.eval()
            res.append((ep + 1, *evaluate()))
    return res


def head_map(Ct, tr, v, g, tau=0.05, hidden=0, lr=1e-2, wd=1e-3, epochs=60):
    """linear / mlp: the map into the frozen text space, softmax over training classes. -> (val, test)"""
    m = np.isin(y, tr)
    Xt, yt = torch.tensor(Xn[m]), torch.tensor([tr.index(c) for c in y[m]])
    Ctr = torch.tensor(Ct[tr])
    torch.manual_seed(ARGS.seed)
    if hidden:
        W = torch.nn.Sequential(torch.nn.Linear(512, hidden), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(hidden, 384))
    else:
        W = torch.nn.Linear(512, 384)

    def scores(x, grp):
        with torch.no_grad():
            z = torch.nn.functional.normalize(W(torch.tensor(x)), dim=-1)
        return (z @ torch.tensor(Ct[grp]).T).numpy()

    res = _sgd(W, Xt, yt, epochs, lr, wd,
               lambda out, t: torch.nn.functional.cross_entropy(
                   torch.nn.functional.normalize(out, dim=-1) @ Ctr.T / tau, t),
               evaluate=lambda: (_acc(scores, v), _acc(scores, g)))
    best = max(res, key=lambda t: t[1])
    return best[1], best[2], {"epoch": best[0]}


def head_ridge(Ct, tr, v, g, lam=1.0, center=False):
    m = np.isin(y, tr)
    if center:  # remove the training classes' mean prompt embedding (what every prompt shares)
        Ct = Ct - Ct[tr].mean(0)
        Ct = Ct / np.linalg.norm(Ct, axis=1, keepdims=True)
    A, T = Xn[m].astype(np.float64), Ct[y[m]].astype(np.float64)
    W = np.linalg.solve(A.T @ A + lam * len(A) * np.eye(A.shape[1]), A.T @ T)

    def scores(x, grp):
        z = x @ W
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        return z @ Ct[grp].T

    return _acc(scores, v), _acc(scores, g), {}


def head_anchor(Ct, tr, v, g, mode="relative", tau_r=0.05, wd=1e-3, lr=1e-2, epochs=60):
    """relative / conse: a softmax classifier over the training classes (the text anchors)."""
    m = np.isin(y, tr)
    Xt, yt = torch.tensor(Xn[m]), torch.tensor([tr.index(c) for c in y[m]])
    A = Ct[tr]  # anchors: the training classes' text embeddings
    torch.manual_seed(ARGS.seed)
    clf = torch.nn.Linear(512, len(tr))

    def scores(x, grp):
        with torch.no_grad():
            p = clf(torch.tensor(x)).softmax(-1).numpy()
        U = Ct[grp]
        if mode == "conse":
            z = p @ A
            z /= np.linalg.norm(z, axis=1, keepdims=True)
            return z @ U.T
        r = np.exp((U @ A.T) / tau_r)
        r /= r.sum(1, keepdims=True)  # each class name as a distribution over the anchors
        pn = p / np.linalg.norm(p, axis=1, keepdims=True)
        return pn @ (r / np.linalg.norm(r, axis=1, keepdims=True)).T

    res = _sgd(clf, Xt, yt, epochs, lr, wd, torch.nn.functional.cross_entropy,
               evaluate=lambda: (_acc(scores, v), _acc(scores, g)))
    best = max(res, key=lambda t: t[1])
    return best[1], best[2], {"epoch": best[0]}


GRIDS = {
    "linear": [dict(tau=t) for t in (0.05, 0.1)],
    "mlp": [dict(tau=t, hidden=256) for t in (0.05, 0.1)],
    "ridge": [dict(lam=lam) for lam in (0.1, 1.0, 10.0, 100.0)],
    "ridge-centred": [dict(lam=lam, center=True) for lam in (0.1, 1.0, 10.0, 100.0)],
    "relative": [dict(mode="relative", tau_r=t) for t in (0.05, 0.1)],
    "conse": [dict(mode="conse")],
}
HEADS = {"linear": head_map, "mlp": head_map, "ridge": head_ridge, "ridge-centred": head_ridge,
         "relative": head_anchor,
         "conse": head_anchor}


def run_setting(head, pname, kw):
    vals, tests = [], []
    for tr, v, g in FOLDS if not ARGS.transfer else [transfer_fold()]:
        a, b, _ = HEADS[head](C(pname), tr, v, g, **kw)
        vals.append(a)
        tests.append(b)
    return {"head": head, "prompts": pname, "setting": kw, "val": float(np.mean(vals)),
            "test_mean": float(np.mean(tests)),
            "test_std": float(np.std(tests, ddof=1)) if len(tests) > 1 else 0.0,
            "test": [round(t, 2) for t in tests], "val_folds": [round(t, 2) for t in vals]}


def show(r, prefix=""):
    print(f"{prefix}{r['head']:8s} {r['prompts']:9s} {json.dumps(r['setting']):36s} val {r['val']:5.1f}  "
          f"test {r['test_mean']:5.1f} ± {r['test_std']:4.1f}  {r['test']}", flush=True)


def supervised(Ct, lr=1e-2, wd=1e-3, epochs=60, tau=0.1):
    """Supervised via captions, the linear head: ESC-50 folds 1-3 train, fold 4 picks the epoch, fold 5
    tests (50-way, every class trained on)."""
    fold = np.array([int(Path(r).name.split("-")[0]) for r in st.items.ids])
    Xt, yt = torch.tensor(Xn[fold <= 3]), torch.tensor(y[fold <= 3])
    Call = torch.tensor(Ct)
    W = torch.nn.Linear(512, 384)

    def acc(f):
        with torch.no_grad():
            z = torch.nn.functional.normalize(W(torch.tensor(Xn[fold == f])), dim=-1)
        return 100 * np.mean((z @ Call.T).argmax(1).numpy() == y[fold == f])

    res = _sgd(W, Xt, yt, epochs, lr, wd,
               lambda out, t: torch.nn.functional.cross_entropy(
                   torch.nn.functional.normalize(out, dim=-1) @ Call.T / tau, t),
               evaluate=lambda: (acc(4), acc(5)))
    return max(res, key=lambda t: t[1])


if __name__ == "__main__":
    rows = []
    if ARGS.study == "supervised":
        for pname in ARGS.prompts.split(","):
            ep, v, t = supervised(C(pname))
            print(f"supervised via captions, {pname}: val (fold 4) {v:.1f}, test (fold 5, 50-way) {t:.1f}, "
                  f"epoch {ep}")
    else:
        for head in ARGS.heads.split(","):
            for pname in ARGS.prompts.split(","):
                cell = [run_setting(head, pname, kw) for kw in GRIDS[head]]
                if ARGS.study == "grid":
                    for r in cell:
                        show(r)
                best = max(cell, key=lambda r: r["val"])  # chosen on validation only
                show(best, "chosen: " if ARGS.study == "grid" else "")
                rows.append({**best, "grid": cell})
        if rows:
            top = max(rows, key=lambda r: r["val"])
            show(top, "best on validation: ")
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(rows, indent=1))
