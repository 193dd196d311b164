"""The benchmark baseline: the digits model served the way a typical team writes it.

Plain FastAPI: a pydantic request body, a numpy conversion, onnxruntime, and a dict returned for
FastAPI's default serialisation. Nothing here is tuned; that is the point of a baseline.

Run it with the uvicorn options `edgeharvest serve` uses:
    .venv/bin/python -m bench.baseline_app --port 8001
or
    .venv/bin/uvicorn bench.baseline_app:create_app --factory --port 8001 \
        --loop uvloop --http httptools --no-access-log --log-level warning
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from pydantic import BaseModel

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "digits" / "model.onnx"
INPUT_NAME = "pixels"
PROBABILITIES = "probabilities"


class PredictRequest(BaseModel):
    instances: list[list[float]]


def load_session(model_path: Path) -> ort.InferenceSession:
    # The same thread settings as the service, so both spend the same on onnxruntime.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def create_app(model_path: Path = DEFAULT_MODEL) -> FastAPI:
    app = FastAPI(title="baseline")
    app.state.session = load_session(model_path)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # `async def` runs inference inline on the event loop, as the service does for small
    # batches; a plain `def` would add a thread-pool hop and flatter the service.
    @app.post("/predict")
    async def predict(body: PredictRequest, request: Request) -> dict[str, Any]:
        session: ort.InferenceSession = request.app.state.session
        batch = np.asarray(body.instances, dtype=np.float32)
        probabilities = session.run([PROBABILITIES], {INPUT_NAME: batch})[0]
        classes = probabilities.argmax(axis=1)
        return {
            "predictions": [
                {"class_index": int(c), "probability": float(row[c])}
                for c, row in zip(classes, probabilities, strict=True)
            ]
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the .onnx file")
    args = parser.parse_args()
    # The options of `edgeharvest serve` (service/cli.py), with its log level set to warning.
    uvicorn.run(
        create_app(args.model),
        host=args.host,
        port=args.port,
        log_level="warning",
        loop="uvloop",
        http="httptools",
        access_log=False,
    )


if __name__ == "__main__":
    main()
