"""Score a batch of predictions against a model's reference profile (no IO)."""

from __future__ import annotations

import numpy as np

from service.exact_knn import ExactKthDistance
from service.neighbour_index import NeighbourIndex, l2_normalize
from service.onnx_classifier import Prediction
from service.reference_profile import ReferenceProfile
from service.scores import (
    NOVELTY_SCORE,
    FlagThresholds,
    PercentileLookup,
    ScoredBatch,
    confidence_scores,
    flag,
)

STANDARDISED_INPUT = "standardised_input"


def standardise(batch: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    flat = batch.reshape(len(batch), -1).astype(np.float32)
    result: np.ndarray = (flat - mean) / np.maximum(std, 1e-6)
    return result


def embedding_of(
    prediction: Prediction, batch: np.ndarray, source: str, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """The L2-normalised embedding a profile of this `source` uses."""
    if source == STANDARDISED_INPUT or prediction.embedding is None:
        return l2_normalize(standardise(batch, mean, std))
    return l2_normalize(prediction.embedding)


class PredictionScorer:
    def __init__(
        self, profile: ReferenceProfile, index: NeighbourIndex, thresholds: FlagThresholds
    ) -> None:
        self.profile = profile
        self.index = index
        self.thresholds = thresholds
        # Exact search goes through the batch-invariant form, so a request's novelty does not
        # depend on what else the batcher gathered with it (see exact_knn.py). An approximate
        # index already computes its distances pair by pair.
        # Its queries are the normalised embeddings of `embed`.
        self._exact = (
            ExactKthDistance(profile.embeddings, unit_queries=True)
            if index.kind == "exact"
            else None
        )
        self._percentiles = {
            name: PercentileLookup(values) for name, values in profile.score_distributions.items()
        }

    def novelty(self, embeddings: np.ndarray) -> np.ndarray:
        """Distance of each normalised embedding to its k-th nearest reference embedding."""
        if self._exact is not None:
            return self._exact.kth_distance(embeddings, self.profile.k)
        return self.index.kth_distance(embeddings, self.profile.k)

    def embed(self, prediction: Prediction, batch: np.ndarray) -> np.ndarray:
        p = self.profile
        return embedding_of(prediction, batch, p.embedding_source, p.input_mean, p.input_std)

    def score(self, prediction: Prediction, batch: np.ndarray) -> tuple[ScoredBatch, np.ndarray]:
        """Scores with percentiles and flags, and the normalised embeddings they used."""
        embeddings = self.embed(prediction, batch)
        scores = confidence_scores(prediction.probabilities, prediction.logits)
        scores[NOVELTY_SCORE] = self.novelty(embeddings)
        lookups = self._percentiles
        percentiles = {
            name: lookups[name](values) for name, values in scores.items() if name in lookups
        }
        low, novel = flag(percentiles, self.thresholds, len(batch))
        predicted = prediction.probabilities.argmax(axis=1)
        return ScoredBatch(predicted, scores, percentiles, low, novel), embeddings


def unscored(prediction: Prediction) -> ScoredBatch:
    """Confidence scores without percentiles, for a model that has no reference profile yet."""
    size = len(prediction.probabilities)
    scores = confidence_scores(prediction.probabilities, prediction.logits)
    none = np.zeros(size, dtype=bool)
    return ScoredBatch(prediction.probabilities.argmax(axis=1), scores, {}, none, none.copy())
