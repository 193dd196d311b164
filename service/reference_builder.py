"""Build a reference profile by running a served model over reference data.

The data is split, per class, into a kNN bank and a held-out part. Held-out scores are measured
against the bank, exactly as production predictions will be, so a production score's percentile
compares like with like (a bank point would find itself at distance 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from service.neighbour_index import build_neighbour_index, default_k
from service.onnx_classifier import OnnxClassifier, Prediction
from service.prediction_scorer import STANDARDISED_INPUT, embedding_of
from service.reference_profile import ReferenceProfile
from service.scores import NOVELTY_SCORE, confidence_scores

ProgressWrapper = Callable[[Iterable[int], int], Iterable[int]]


def _no_progress(items: Iterable[int], total: int) -> Iterable[int]:
    return items


def stratified_split(
    strata: np.ndarray, holdout_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(bank, holdout) indices; every stratum with at least 2 members gives 1+ to each side."""
    bank, holdout = [], []
    for value in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == value))
        if len(members) < 2:
            bank.append(members)
            continue
        n_holdout = min(len(members) - 1, max(1, round(len(members) * holdout_fraction)))
        holdout.append(members[:n_holdout])
        bank.append(members[n_holdout:])
    empty = np.empty(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(bank)) if bank else empty,
        np.sort(np.concatenate(holdout)) if holdout else empty,
    )


def stratified_subsample(
    indices: np.ndarray, strata: np.ndarray, limit: int, rng: np.random.Generator
) -> np.ndarray:
    """At most `limit` of `indices`, keeping each stratum's share (at least one each)."""
    if len(indices) <= limit:
        return indices
    chosen = []
    values, counts = np.unique(strata[indices], return_counts=True)
    for value, count in zip(values, counts, strict=True):
        members = indices[strata[indices] == value]
        take = max(1, int(count * limit / len(indices)))
        chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))[:limit]


def run_in_batches(
    model: OnnxClassifier, inputs: np.ndarray, batch_size: int, progress: ProgressWrapper
) -> Prediction:
    parts: list[Prediction] = []
    starts = range(0, len(inputs), batch_size)
    for start in progress(starts, len(starts)):
        parts.append(model.predict(inputs[start : start + batch_size]))
    embeddings = [p.embedding for p in parts]
    logits = [p.logits for p in parts]
    return Prediction(
        probabilities=np.concatenate([p.probabilities for p in parts]),
        embedding=None if embeddings[0] is None else np.concatenate(embeddings),  # type: ignore[arg-type]
        logits=None if logits[0] is None else np.concatenate(logits),  # type: ignore[arg-type]
    )


def build_reference_profile(
    model: OnnxClassifier,
    inputs: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    max_embeddings: int = 20_000,
    holdout_fraction: float = 0.2,
    max_holdout_samples: int = 5_000,
    batch_size: int = 256,
    seed: int = 0,
    progress: ProgressWrapper = _no_progress,
    source: str = "",
    validation_inputs: np.ndarray | None = None,
    validation_labels: np.ndarray | None = None,
) -> ReferenceProfile:
    """With `validation_inputs` (data the model was not trained on), the whole of `inputs`
    is the kNN bank and the score distributions come from the validation data; without, each
    class of `inputs` is split. Prefer validation data: on its own training data a model is
    more confident than in production, which would skew every percentile."""
    if len(inputs) < 2:
        raise ValueError(f"reference data holds {len(inputs)} rows; at least 2 are needed")
    if labels is not None and len(labels) != len(inputs):
        raise ValueError(f"{len(labels)} labels for {len(inputs)} rows; expected one per row")
    rng = np.random.default_rng(seed)
    n_main = len(inputs)
    if validation_inputs is not None:
        if validation_labels is not None and len(validation_labels) != len(validation_inputs):
            raise ValueError(
                f"{len(validation_labels)} validation labels for {len(validation_inputs)} rows"
            )
        if (labels is None) != (validation_labels is None):
            raise ValueError("give labels for both the reference and the validation data, or none")
        inputs = np.concatenate([inputs, validation_inputs.astype(inputs.dtype, copy=False)])
        if labels is not None and validation_labels is not None:
            labels = np.concatenate([labels, validation_labels])
    prediction = run_in_batches(model, inputs, batch_size, progress)
    predicted = prediction.probabilities.argmax(axis=1)
    strata = labels.astype(np.int64) if labels is not None else predicted

    flat = inputs.reshape(len(inputs), -1).astype(np.float32)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    source_kind = "embedding" if prediction.embedding is not None else STANDARDISED_INPUT
    embeddings = embedding_of(prediction, inputs, source_kind, mean, std)

    if validation_inputs is None:
        bank, holdout = stratified_split(strata, holdout_fraction, rng)
    else:
        bank, holdout = np.arange(n_main), np.arange(n_main, len(inputs))
    bank = stratified_subsample(bank, strata, max_embeddings, rng)
    k = default_k(len(bank))
    index = build_neighbour_index(embeddings[bank])

    holdout_logits = None if prediction.logits is None else prediction.logits[holdout]
    scores = confidence_scores(prediction.probabilities[holdout], holdout_logits)
    scores[NOVELTY_SCORE] = index.kth_distance(embeddings[holdout], k)
    drift_sample = stratified_subsample(holdout, strata, max_holdout_samples, rng)

    n_classes = prediction.probabilities.shape[1]
    prior_source = strata if labels is not None else predicted
    prior = np.bincount(prior_source, minlength=n_classes)[:n_classes] / len(prior_source)
    return ReferenceProfile(
        model_name=model.name,
        model_version=model.version,
        model_sha256=model.manifest.sha256,
        k=k,
        embeddings=embeddings[bank],
        embedding_classes=strata[bank],
        score_distributions={name: np.sort(values) for name, values in scores.items()},
        class_prior=prior,
        holdout_probabilities=prediction.probabilities[drift_sample],
        holdout_embeddings=embeddings[drift_sample],
        holdout_inputs=flat[drift_sample],
        input_mean=mean,
        input_std=std,
        embedding_source=source_kind,
        metadata={
            "rows": len(inputs),
            "labelled": labels is not None,
            "bank_size": len(bank),
            "holdout_size": len(holdout),
            "holdout_source": "validation data" if validation_inputs is not None else "split",
            "seed": seed,
            "source": source,
            # On the held-out rows: accuracy on training data says little.
            "accuracy": None
            if labels is None
            else float((predicted[holdout] == labels[holdout]).mean()),
        },
    )
