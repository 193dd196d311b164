"""Does novelty find classes the model has never seen? AUROC on digits with 8 and 9 held out.

Builds the digits model with digits 8 and 9 removed from training (and its reference profile
from the remaining training split), then scores the held-out test digits 0-7 (in distribution)
and every 8 and 9 (unseen classes) through the service's own scorer. Each score's AUROC for
separating unseen from seen is printed next to the max-probability baseline (Hendrycks &
Gimpel 2017), and written to JSON.

    .venv/bin/python bench/novelty_auroc.py [--output bench/results/novelty_auroc.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.model_repository import ModelRepository  # noqa: E402
from service.neighbour_index import build_neighbour_index  # noqa: E402
from service.onnx_classifier import SessionConfig  # noqa: E402
from service.prediction_scorer import PredictionScorer  # noqa: E402
from service.scores import FlagThresholds  # noqa: E402

HELD_OUT = (8, 9)
# Larger = more unusual, for every score: confidence scores are negated.
SIGNS = {"novelty": 1.0, "max_probability": -1.0, "margin": -1.0, "entropy": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "bench/results/novelty_auroc.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "digits-holdout"
        subprocess.run(
            [
                sys.executable,
                str(REPO / "models/digits/build.py"),
                "--out",
                str(out),
                "--holdout-classes",
                *map(str, HELD_OUT),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        repository = ModelRepository.from_directory(Path(tmp), SessionConfig())
        model = repository.get("digits-holdout")
        profile = repository.references[("digits-holdout", "1")]
        scorer = PredictionScorer(
            profile, build_neighbour_index(profile.embeddings), FlagThresholds()
        )
        # The same split as the build script: seen = held-out test digits of the trained classes.
        x, y = load_digits(return_X_y=True)
        x = x.astype(np.float32)
        _, x_test, _, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
        seen = x_test[~np.isin(y_test, HELD_OUT)]
        unseen = x[np.isin(y, HELD_OUT)]
        batch = np.concatenate([seen, unseen])
        is_unseen = np.r_[np.zeros(len(seen)), np.ones(len(unseen))]
        scored, _ = scorer.score(model.predict(batch), batch)
        flagged_novel = scored.novel
    rows = {
        name: float(roc_auc_score(is_unseen, SIGNS[name] * scored.scores[name])) for name in SIGNS
    }
    baseline = rows["max_probability"]
    print(
        f"digits, classes {HELD_OUT} unseen in training: {len(seen)} seen test images, "
        f"{len(unseen)} unseen images; kNN bank {len(profile.embeddings)}, k={profile.k}\n"
    )
    print("| score | AUROC | vs max probability |")
    print("| --- | --- | --- |")
    for name, auroc in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {auroc:.4f} | {auroc - baseline:+.4f} |")
    recall = float(flagged_novel[is_unseen == 1].mean())
    false_flags = float(flagged_novel[is_unseen == 0].mean())
    print(
        f"\n`novel` flag (99th percentile): flags {recall:.1%} of unseen-class images and "
        f"{false_flags:.1%} of seen-class test images"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "novelty_auroc",
                "python": platform.python_version(),
                "held_out_classes": list(HELD_OUT),
                "seen": len(seen),
                "unseen": len(unseen),
                "bank_size": len(profile.embeddings),
                "k": profile.k,
                "auroc": rows,
                "novel_flag_rate": {"unseen": recall, "seen": false_flags},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
