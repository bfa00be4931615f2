"""Audio protocols over a config's caption-from-class-names source (lightcrl.app.protocols).

    .venv/bin/python benchmarks/audio_protocols.py --config configs/audio_zeroshot.yaml \
        --protocol class-disjoint --out runs/audio/class-disjoint [--set optim.epochs=5 ...]
    .venv/bin/python benchmarks/audio_protocols.py --config configs/audio_zeroshot.yaml \
        --protocol supervised-captions --out runs/audio/supervised
    .venv/bin/python benchmarks/audio_protocols.py --config configs/three_modalities.yaml --source 1 \
        --protocol transfer --test esc10:../shared/data/esc10 --out runs/audio/transfer

Prints one line per fold and ``top1 mean ± std (min..max)``; writes OUT/protocol.json. Folds whose run
directory already holds a finished training are evaluated again, not retrained.
"""

from __future__ import annotations

import argparse
import logging

import common  # noqa: F401  (puts src/ on the path)

from lightcrl.app.config import load_config
from lightcrl.app.protocols import PROTOCOLS, run_protocol


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--source", type=int, default=0, help="index of the templates-captions source")
    p.add_argument("--protocol", choices=PROTOCOLS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--spec", help="training dataset (default: the source's spec)")
    p.add_argument("--test", help="test dataset of the transfer protocol")
    p.add_argument("--groups", type=int, default=5)
    p.add_argument("--group-seed", type=int, default=0)
    p.add_argument("--folds", type=int, nargs="*", help="only these folds of class-disjoint")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(a.config, a.set)
    cfg = cfg.model_copy(update={"progress": False})
    res = run_protocol(cfg, a.source, a.protocol, a.out, spec=a.spec, test_spec=a.test, groups=a.groups,
                       group_seed=a.group_seed, folds=a.folds)
    for r in res["folds"]:
        print(f"fold {r['fold']}: top1 {r['top1']:.2f} (chance {r['chance']:.1f}, n={r['n']}, "
              f"best epoch {r['best_epoch']}, val {r['best_val']})")
    print(f"{res['protocol']}: top1 {res['top1_mean']:.2f} ± {res['top1_std']:.2f} "
          f"({res['top1_min']:.2f}..{res['top1_max']:.2f}) over {len(res['folds'])} fold(s); "
          f"chance {res['chance']:.1f}")


if __name__ == "__main__":
    main()
