"""Locked-text side study for the class-disjoint audio protocol (docs/audio.md, "Results").

    .venv/bin/python benchmarks/audio_locked_text.py [--data ../shared/data]

The text side is the frozen MiniLM space itself (no trained text head): a linear map (or a 1-hidden-layer
MLP) from aiSFX's pooled, standardised clip features to MiniLM's 384-d space is trained with a softmax over
the training classes' caption embeddings (temperature tau), on the same 5 folds as the protocol: train on
3 class groups, pick the epoch (every 5, up to 60) on the validation group g+1, test 10-way on group g.
Class embeddings: mean of the normalised MiniLM embeddings of the 6 templates, or of the 5 class
descriptions (esc50_descriptions.json). Prints val and test top-1 (mean, std over folds, per fold).
Reads the cached ESC-50 aiSFX store (extracted on first use).
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
_p = argparse.ArgumentParser(description=__doc__)
_p.add_argument("--data", default="../shared/data")
_p.add_argument("--only-supervised", action="store_true")
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
        o = enc.encode_batch(b)
        out.append(o.pooled.numpy())
    z = np.concatenate(out)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def class_emb(prompts_per_class):
    flat = [p for ps in prompts_per_class for p in ps]
    z = embed_texts(flat)
    out = []
    i = 0
    for ps in prompts_per_class:
        m = z[i : i + len(ps)].mean(0)
        out.append(m / np.linalg.norm(m))
        i += len(ps)
    return np.stack(out)


T6 = _resource_lines("audio_templates.txt")
desc = json.loads(
    (
        Path(__file__).resolve().parents[1] / "src/lightcrl/resources/templates/esc50_descriptions.json"
    ).read_text()
)
C = {
    "t6": class_emb([[t.replace("{c}", n) for t in T6] for n in names]),
    "desc": class_emb([desc[n] for n in names]),
}
mu = X.mean(0)
sd = X.std(0) + 1e-6
Xn = (X - mu) / sd
groups = class_groups(50)


def run(Ct, g, v, lr=1e-2, wd=1e-3, epochs=60, tau=0.05, hidden=0, seed=0):
    torch.manual_seed(seed)
    tr = [c for k in range(5) if k not in (g, v) for c in groups[k]]
    mtr = np.isin(y, tr)
    Xt = torch.tensor(Xn[mtr])
    yt = torch.tensor([tr.index(c) for c in y[mtr]])
    Ctr = torch.tensor(Ct[tr])
    if hidden:
        W = torch.nn.Sequential(
            torch.nn.Linear(512, hidden), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(hidden, 384)
        )
    else:
        W = torch.nn.Linear(512, 384)
    opt = torch.optim.AdamW(W.parameters(), lr=lr, weight_decay=wd)
    res = []

    def acc(grp):
        m = np.isin(y, groups[grp])
        Cg = torch.tensor(Ct[groups[grp]])
        W.eval()
        with torch.no_grad():
            z = torch.nn.functional.normalize(W(torch.tensor(Xn[m])), dim=-1)
        W.train()
        p = (z @ Cg.T).argmax(1).numpy()
        return 100 * np.mean(np.asarray(groups[grp])[p] == y[m])

    for ep in range(epochs):
        perm = torch.randperm(len(Xt))
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            z = torch.nn.functional.normalize(W(Xt[b]), dim=-1)
            loss = torch.nn.functional.cross_entropy(z @ Ctr.T / tau, yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep % 5 == 4:
            res.append((ep + 1, acc(v), acc(g)))
    return res


for cname in ([] if ARGS.only_supervised else ["t6", "desc"]):
    for hidden in [0, 256]:
        for tau in [0.05, 0.1]:
            vals = []
            tests = []
            for g in range(5):
                v = (g + 1) % 5
                r = run(C[cname], g, v, tau=tau, hidden=hidden)
                best = max(r, key=lambda t: t[1])
                vals.append(best[1])
                tests.append(best[2])
            print(
                cname,
                "hidden",
                hidden,
                "tau",
                tau,
                f"val {np.mean(vals):.1f}",
                f"test {np.mean(tests):.1f} ± {np.std(tests, ddof=1):.1f}",
                [round(float(t), 1) for t in tests],
                flush=True,
            )


def supervised(Ct, lr=1e-2, wd=1e-3, epochs=60, tau=0.1, seed=0):
    """Supervised via captions, the same head: ESC-50 folds 1-3 train, fold 4 picks the epoch, fold 5
    tests (50-way, every class trained on)."""
    torch.manual_seed(seed)
    fold = np.array([int(Path(r).name.split("-")[0]) for r in st.items.ids])
    Xt, yt = torch.tensor(Xn[fold <= 3]), torch.tensor(y[fold <= 3])
    W = torch.nn.Linear(512, 384)
    opt = torch.optim.AdamW(W.parameters(), lr=lr, weight_decay=wd)
    Call = torch.tensor(Ct)

    def acc(f):
        with torch.no_grad():
            z = torch.nn.functional.normalize(W(torch.tensor(Xn[fold == f])), dim=-1)
        return 100 * np.mean((z @ Call.T).argmax(1).numpy() == y[fold == f])

    res = []
    for ep in range(epochs):
        perm = torch.randperm(len(Xt))
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            z = torch.nn.functional.normalize(W(Xt[b]), dim=-1)
            loss = torch.nn.functional.cross_entropy(z @ Call.T / tau, yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep % 5 == 4:
            res.append((ep + 1, acc(4), acc(5)))
    best = max(res, key=lambda t: t[1])
    return best


for cname in ["t6", "desc"]:
    ep, v, t = supervised(C[cname])
    print(f"supervised via captions, {cname}: val (fold 4) {v:.1f}, test (fold 5, 50-way) {t:.1f}, "
          f"epoch {ep}")
