"""Watch every prediction: score it against the reference, count it, and log it as events.

Runs on the request path, so it does no IO: each inference batch's events go, as one stream
entry, to the in-process buffer of the event log, whose background writer talks to Redis.
Nothing here can fail a prediction.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from service.batch_plan import RequestSpan
from service.events import encode_batch_entry
from service.metrics import ServiceMetrics
from service.neighbour_index import l2_normalize
from service.onnx_classifier import OnnxClassifier, Prediction
from service.prediction_scorer import PredictionScorer, unscored
from service.redis_keys import event_stream
from service.scores import ScoredBatch

logger = logging.getLogger("edgeharvest.monitoring")


class EventSink(Protocol):
    def append(self, stream_key: str, fields: dict[str, bytes | str], events: int) -> None: ...


class PredictionMonitor:
    def __init__(
        self,
        scorers: dict[tuple[str, str], PredictionScorer],
        metrics: ServiceMetrics,
        events: EventSink | None,
        *,
        input_sample_rate: float = 1.0,
        max_input_bytes: int = 65536,
        rng: random.Random | None = None,
    ) -> None:
        self.scorers = scorers
        self.metrics = metrics
        self.events = events
        self.input_sample_rate = input_sample_rate
        self.max_input_bytes = max_input_bytes
        self._rng = rng or random.Random()

    def scorer(self, model: OnnxClassifier) -> PredictionScorer | None:
        return self.scorers.get((model.name, model.version))

    def _stored_inputs(self, batch: np.ndarray, requests: int) -> list[bool]:
        """Whether each request's inputs go into its events: sampled per request, as when each
        is served alone."""
        if batch[0].nbytes > self.max_input_bytes:
            return [False] * requests
        if self.input_sample_rate >= 1.0:
            return [True] * requests
        return [self._rng.random() < self.input_sample_rate for _ in range(requests)]

    def observe(
        self,
        model: OnnxClassifier,
        batch: np.ndarray,
        prediction: Prediction,
        spans: Sequence[RequestSpan],
    ) -> ScoredBatch:
        """Score, count and log a batch once, however many requests (`spans`) it gathers."""
        start = time.perf_counter()
        scorer = self.scorer(model)
        if scorer is None:
            # No reference profile yet: confidence scores only, and the raw embedding (or the
            # input) normalised, so events are still logged for the profile and the selector.
            scored = unscored(prediction)
            source = prediction.embedding
            if source is None:
                source = batch.reshape(len(batch), -1).astype(np.float32)
            embeddings = l2_normalize(source)
        else:
            scored, embeddings = scorer.score(prediction, batch)
        model_metrics = self.metrics.for_model(model.name, model.version)
        model_metrics.observe_batch(scored)
        if self.events is not None:
            entry = encode_batch_entry(
                model=model.name,
                version=model.version,
                spans=spans,
                batch=batch,
                prediction=prediction,
                scored=scored,
                embeddings=embeddings,
                timestamp=time.time(),
                store_inputs=self._stored_inputs(batch, len(spans)),
            )
            self.events.append(event_stream(model.name, model.version), entry, len(batch))
        model_metrics.scoring_duration.observe(time.perf_counter() - start)
        return scored
