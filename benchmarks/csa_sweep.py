"""CSA's hyper-parameters against VALIDATION data only (docs/results.md, issue 14 section).

    PYTHONPATH=src .venv/bin/python benchmarks/csa_sweep.py [--reg 0.1,0.3,1,3] [--seed 0] > sweep.jsonl

Fits CSA (lightcrl.baselines.csa) on the kept 90 % of Flickr8k TRAIN (the trainer's ``holdout: 0.1``
with that seed) and prints, per (reg, dims, exponent), one JSON line: mean R@1 on the held-out 10 %
(every caption), and zero-shot top-1 on the 2,000-image seeded samples of CIFAR-10 TRAIN and Tiny ImageNet
TRAIN (the dataset's templates). No dev or test split is read. Each reg is one CCA fit; dims and
exponent only slice and weight it, so the whole sweep costs a few fits.
"""

import argparse
import itertools
import json
import time

import numpy as np

from lightcrl.baselines.asif import anchor_features, encode_pooled, linked_pairs
from lightcrl.baselines.csa import csa_model, fit_cca
from lightcrl.embed import EmbedOptions, cached_store
from lightcrl.encoders import get_encoder
from lightcrl.metrics import retrieval, zeroshot

ZEROSHOT = {"cifar10": "imagefolder:{data}/cifar10", "tiny": "imagefolder:{data}/tinyimagenet"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--reg", default="0.1,0.3,1,3")
    ap.add_argument("--dims", default="16,32,64,128,256,384")
    ap.add_argument("--exponent", default="0,1,2,4")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    opts = EmbedOptions(seed=args.seed, progress=False)
    flickr = f"flickr8k:{args.data}/flickr8k"
    media = cached_store("efficientnet-lite0", flickr, "train", opts)
    text = cached_store("minilm-l6", flickr, "train", opts)
    m_feat, t_feat = anchor_features(media, text, "all_pairs", args.seed, 0.1)  # the kept 90 %
    held = linked_pairs(media, text).split_media(0.1, args.seed)[1]  # the trainer's held-out 10 %
    rows = np.unique(held.media_index)
    held_media, held_text = media.pooled(rows), text.pooled(held.text_index)
    gt = np.searchsorted(rows, held.media_index)
    enc = get_encoder("minilm-l6", device="cpu")

    def raw_text(texts: list[str]) -> np.ndarray:
        out = []
        for s in range(0, len(texts), 256):
            out.append(enc.encode_batch(enc.collate([enc.transform(x) for x in texts[s : s + 256]]))
                       .pooled.float().numpy())
        return np.concatenate(out)

    zs = {}
    for name, spec in ZEROSHOT.items():
        st = cached_store("efficientnet-lite0", spec.format(data=args.data), "train",
                          EmbedOptions(limit=2000, seed=0, progress=False))
        cls, tpl = st.classnames, st.templates
        prompts = raw_text([zeroshot.fill_template(t, c) for c in cls for t in tpl])
        zs[name] = (st.pooled(), st.items.labels, prompts.reshape(len(cls), len(tpl), -1))
    print(json.dumps({"setup_s": round(time.time() - t0, 1), "n_fit_pairs": len(m_feat),
                      "n_held_out_images": len(rows)}), flush=True)
    for reg in (float(x) for x in args.reg.split(",")):
        fit = fit_cca(m_feat, t_feat, reg)
        for d, e in itertools.product((int(x) for x in args.dims.split(",")),
                                      (float(x) for x in args.exponent.split(","))):
            if d > fit.rank:
                continue
            model = csa_model(fit, ("image", "text"), d, e)
            r = retrieval.evaluate(encode_pooled(model, "image", held_media),
                                   encode_pooled(model, "text", held_text), gt)
            row = {"reg": reg, "dims": d, "exponent": e,
                   "val_R1": (r["image_retrieval_recall@1"] + r["text_retrieval_recall@1"]) / 2}
            for name, (img, labels, prompts) in zs.items():
                pe = encode_pooled(model, "text", prompts.reshape(-1, prompts.shape[-1]))
                ce = pe.reshape(prompts.shape[0], prompts.shape[1], -1).mean(1)
                ce /= np.linalg.norm(ce, axis=1, keepdims=True)
                pred = (encode_pooled(model, "image", img) @ ce.T).argmax(1)
                row[f"zs_{name}_train"] = float(100 * np.mean(pred == labels))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
