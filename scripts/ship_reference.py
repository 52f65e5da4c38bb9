"""Copy a finished reference-kit training run into the package (compress/assets), ready to commit.

    python scripts/train_reference.py --out runs/reference --stage all ...   # train (hours on CPU)
    python scripts/ship_reference.py --run runs/reference                    # then ship it

Writes, each folder atomically (a temporary folder renamed when complete):

* compress/assets/reference/        the TSD student in the TSD-SR release layout (base/ in fp16,
                                    checkpoint/tsdsr/*.safetensors, dataset/{default,null}/*.pt)
* compress/assets/reference/training/<stage>/{metrics.json,log.csv.gz,report.md}
                                    how each stage trained (vae, decoder, prior, student, student-rec)
* compress/assets/reference-rec/    the reconstruction-only baseline: its LoRAs and embeddings only; it loads
                                    on the shared base (`--base-model compress/assets/reference/base`)

Refuses (exit 2, nothing written) when a stage is unfinished or the result would exceed the 40 MB budget.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BUDGET_MB = 40.0
STAGES = ("vae", "decoder", "prior", "student", "student-rec")


class _OverBudget(Exception):
    pass


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    from compress.io import atomic_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/reference"), help="output root of train_reference.py")
    parser.add_argument("--dest", type=Path, default=REPO / "compress/assets",
                        help="where reference/ and reference-rec/ are written")
    ns = parser.parse_args(argv)

    missing = [f"{ns.run / stage / 'metrics.json'}" for stage in STAGES if not (ns.run / stage / "metrics.json").is_file()]
    missing += [str(ns.run / s / "model") for s in ("student", "student-rec") if not (ns.run / s / "model").is_dir()]
    if missing:
        print("error: unfinished training run; missing " + ", ".join(missing)
              + f". Finish it with: python scripts/train_reference.py --out {ns.run}", file=sys.stderr)
        return 2

    reference, rec = ns.dest / "reference", ns.dest / "reference-rec"
    rec_parts = ("checkpoint", "dataset")
    rec_mb = sum(_size_mb(ns.run / "student-rec" / "model" / part) for part in rec_parts)
    try:
        with atomic_dir(reference, overwrite=True) as tmp:
            shutil.copytree(ns.run / "student" / "model", tmp, dirs_exist_ok=True)
            for stage in STAGES:
                target = tmp / "training" / stage
                target.mkdir(parents=True)
                for name in ("metrics.json", "report.md"):
                    if (ns.run / stage / name).is_file():
                        shutil.copy2(ns.run / stage / name, target / name)
                # mtime=0: the same log gives the same bytes, so reshipping an unchanged run changes nothing in git
                with open(ns.run / stage / "log.csv", "rb") as src, open(target / "log.csv.gz", "wb") as raw:
                    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="log.csv") as dst:
                        shutil.copyfileobj(src, dst)
            reference_mb = _size_mb(tmp)
            if reference_mb + rec_mb > BUDGET_MB:  # checked before the rename, so nothing is written
                raise _OverBudget(f"{reference} ({reference_mb:.1f} MB) and {rec} ({rec_mb:.1f} MB) would be "
                                  f"{reference_mb + rec_mb:.1f} MB, over the {BUDGET_MB:.0f} MB budget")
    except _OverBudget as error:
        print(f"error: {error}; nothing was written. Train with train.save_half=true or a smaller preset.",
              file=sys.stderr)
        return 2
    with atomic_dir(rec, overwrite=True) as tmp:
        for part in rec_parts:
            shutil.copytree(ns.run / "student-rec" / "model" / part, tmp / part)
    print(f"shipped {reference} ({reference_mb:.1f} MB) and {rec} ({rec_mb:.1f} MB); "
          f"{reference_mb + rec_mb:.1f} MB in all (budget {BUDGET_MB:.0f} MB)")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
