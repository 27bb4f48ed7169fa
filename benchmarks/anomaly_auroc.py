"""How well a score of `mnist-vae score` tells unfamiliar images from familiar ones: the AUROC.

    mnist-vae score data/mnist.npz --model M --complexity --out inliers.parquet
    mnist-vae score data/fashion-mnist.npz --model M --complexity --out outliers.parquet
    python benchmarks/anomaly_auroc.py inliers.parquet outliers.parquet

For each score column (neg_elbo, corrected_bits), the probability that a random outlier scores
higher than a random inlier (ties count half): 1 is a perfect detector, 0.5 chance, below 0.5 a
detector that prefers the outliers (the known failure of likelihoods on simpler images).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Mann-Whitney U of the outliers over the inliers, divided by the number of pairs."""
    scores = np.concatenate([inliers, outliers])
    ranks = pd.Series(scores).rank(method="average").to_numpy()  # ties share their mean rank
    u = ranks[len(inliers) :].sum() - len(outliers) * (len(outliers) + 1) / 2
    return float(u / (len(inliers) * len(outliers)))


def main(inlier_path: str, outlier_path: str) -> None:
    inliers, outliers = pd.read_parquet(inlier_path), pd.read_parquet(outlier_path)
    for column in ("neg_elbo", "corrected_bits"):
        if column in inliers and column in outliers:
            value = auroc(inliers[column].to_numpy(np.float64), outliers[column].to_numpy(np.float64))
            print(
                f"{column}: AUROC {value:.4f} ({len(inliers)} inliers, mean {inliers[column].mean():.2f}; "
                f"{len(outliers)} outliers, mean {outliers[column].mean():.2f})"
            )


if __name__ == "__main__":
    main(*sys.argv[1:3])
