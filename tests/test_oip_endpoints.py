"""Open Inference Protocol conformance on the default digits model, through the app factory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_digits

DIGITS = load_digits()
X = DIGITS.data.astype(np.float32)
Y = DIGITS.target


def infer_body(rows: np.ndarray, **extra: object) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "pixels", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
        ],
        **extra,
    }


def outputs_by_name(document: dict[str, object]) -> dict[str, dict[str, object]]:
    return {o["name"]: o for o in document["outputs"]}  # type: ignore[attr-defined,index]


# ---- health and metadata ------------------------------------------------------------------


def test_live_and_ready(digits_client: TestClient) -> None:
    assert digits_client.get("/v2/health/live").json() == {"live": True}
    ready = digits_client.get("/v2/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}


def test_server_metadata_advertises_binary_extension(digits_client: TestClient) -> None:
    body = digits_client.get("/v2").json()
    assert body["name"] == "edgeharvest"
    assert "binary_tensor_data" in body["extensions"]
    assert isinstance(body["version"], str)


@pytest.mark.parametrize("path", ["/v2/models/digits", "/v2/models/digits/versions/1"])
def test_model_metadata(digits_client: TestClient, path: str) -> None:
    body = digits_client.get(path).json()
    assert body["name"] == "digits"
    assert body["versions"] == ["1"]
    assert body["platform"] == "onnxruntime_onnx"
    assert body["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["probabilities"]["datatype"] == "FP32"
    assert outputs["probabilities"]["shape"] == [-1, 10]
    assert outputs["embedding"]["datatype"] == "FP32"


@pytest.mark.parametrize("path", ["/v2/models/digits/ready", "/v2/models/digits/versions/1/ready"])
def test_model_ready(digits_client: TestClient, path: str) -> None:
    response = digits_client.get(path)
    assert response.status_code == 200
    assert response.json() == {"name": "digits", "version": "1", "ready": True}


# ---- inference -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2/models/digits/infer", "/v2/models/digits/versions/1/infer"])
def test_infer_nested_data_predicts_digits(digits_client: TestClient, path: str) -> None:
    rows = X[:50]
    response = digits_client.post(path, json=infer_body(rows))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model_name"] == "digits"
    assert body["model_version"] == "1"
    assert "id" not in body
    probabilities = outputs_by_name(body)["probabilities"]
    assert probabilities["shape"] == [50, 10]
    assert probabilities["datatype"] == "FP32"
    probs = np.asarray(probabilities["data"], dtype=np.float32).reshape(50, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.argmax(axis=1) == Y[:50]).mean() >= 0.9


def test_flat_and_nested_data_give_the_same_result(digits_client: TestClient) -> None:
    rows = X[:3]
    nested = digits_client.post("/v2/models/digits/infer", json=infer_body(rows)).json()
    flat_body = infer_body(rows)
    flat_body["inputs"][0]["data"] = rows.ravel().tolist()  # type: ignore[index]
    flat = digits_client.post("/v2/models/digits/infer", json=flat_body).json()
    assert nested["outputs"] == flat["outputs"]


def test_id_is_echoed(digits_client: TestClient) -> None:
    body = digits_client.post(
        "/v2/models/digits/infer", json=infer_body(X[:1], id="request-42")
    ).json()
    assert body["id"] == "request-42"


def test_output_selection(digits_client: TestClient) -> None:
    body = digits_client.post(
        "/v2/models/digits/infer",
        json=infer_body(X[:2], outputs=[{"name": "embedding"}]),
    ).json()
    assert [o["name"] for o in body["outputs"]] == ["embedding"]
    assert body["outputs"][0]["shape"][0] == 2


def test_parameters_are_accepted(digits_client: TestClient) -> None:
    response = digits_client.post(
        "/v2/models/digits/infer", json=infer_body(X[:1], parameters={"custom": "x"})
    )
    assert response.status_code == 200


def _split_binary(content: bytes, header_length: int) -> tuple[dict[str, object], bytes]:
    return json.loads(content[:header_length]), content[header_length:]


def test_binary_input_and_output(digits_client: TestClient) -> None:
    rows = X[:4]
    header = {
        "inputs": [
            {
                "name": "pixels",
                "shape": [4, 64],
                "datatype": "FP32",
                "parameters": {"binary_data_size": rows.nbytes},
            }
        ],
        "outputs": [
            {"name": "probabilities", "parameters": {"binary_data": True}},
            {"name": "embedding"},
        ],
    }
    header_bytes = json.dumps(header).encode()
    response = digits_client.post(
        "/v2/models/digits/infer",
        content=header_bytes + rows.astype("<f4").tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header_bytes)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    document, blob = _split_binary(response.content, length)
    outputs = outputs_by_name(document)
    size = outputs["probabilities"]["parameters"]["binary_data_size"]  # type: ignore[index]
    assert size == 4 * 10 * 4 == len(blob)
    binary_probs = np.frombuffer(blob, dtype="<f4").reshape(4, 10)
    json_probs = digits_client.post("/v2/models/digits/infer", json=infer_body(rows)).json()
    expected = np.asarray(outputs_by_name(json_probs)["probabilities"]["data"], dtype=np.float32)
    np.testing.assert_array_equal(binary_probs.ravel(), expected)
    assert "data" in outputs["embedding"]


def test_binary_data_output_parameter_returns_every_output_binary(
    digits_client: TestClient,
) -> None:
    response = digits_client.post(
        "/v2/models/digits/infer",
        json=infer_body(X[:1], parameters={"binary_data_output": True}),
    )
    length = int(response.headers["inference-header-content-length"])
    document, blob = _split_binary(response.content, length)
    sizes = [o["parameters"]["binary_data_size"] for o in document["outputs"]]  # type: ignore[attr-defined,index]
    assert len(sizes) == 2
    assert sum(sizes) == len(blob)


# ---- errors --------------------------------------------------------------------------------


def _error(response: object, status: int) -> str:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    return str(body["error"])


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/digits/versions/7",
        "/v2/models/digits/versions/7/ready",
    ],
)
def test_unknown_model_or_version_is_404(digits_client: TestClient, path: str) -> None:
    message = _error(digits_client.get(path), 404)
    assert "digits" in message


def test_infer_unknown_model_is_404(digits_client: TestClient) -> None:
    message = _error(digits_client.post("/v2/models/nope/infer", json=infer_body(X[:1])), 404)
    assert message == "unknown model 'nope'; this server serves ['digits']"


def _post(client: TestClient, body: object) -> object:
    return client.post("/v2/models/digits/infer", json=body)


def test_wrong_shape_is_400(digits_client: TestClient) -> None:
    body = infer_body(X[:1, :60])
    message = _error(_post(digits_client, body), 400)
    assert message == "input 'pixels' has shape [1, 60]; expected [-1, 64] (-1 = any)"


def test_data_not_matching_shape_is_400(digits_client: TestClient) -> None:
    body = infer_body(X[:1])
    body["inputs"][0]["shape"] = [2, 64]  # type: ignore[index]
    message = _error(_post(digits_client, body), 400)
    assert message == "input 'pixels' carries 64 values; shape [2, 64] needs 128"


def test_wrong_datatype_is_400(digits_client: TestClient) -> None:
    body = infer_body(X[:1])
    body["inputs"][0]["datatype"] = "INT32"  # type: ignore[index]
    assert _error(_post(digits_client, body), 400) == (
        "input 'pixels' has datatype 'INT32'; expected FP32"
    )


def test_non_numeric_data_is_400(digits_client: TestClient) -> None:
    body = infer_body(X[:1])
    body["inputs"][0]["data"] = ["a"] * 64  # type: ignore[index]
    message = _error(_post(digits_client, body), 400)
    assert message.startswith("input 'pixels' data cannot be read as FP32")


def test_infinity_is_400(digits_client: TestClient) -> None:
    body = infer_body(X[:1])
    body["inputs"][0]["data"][0][5] = 1e39  # type: ignore[index]
    message = _error(_post(digits_client, body), 400)
    assert "first at flat index 5" in message
    assert "expected finite numbers" in message


def test_nan_in_binary_data_is_400(digits_client: TestClient) -> None:
    rows = X[:1].copy()
    rows[0, 3] = np.nan
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 256},
                }
            ]
        }
    ).encode()
    response = digits_client.post(
        "/v2/models/digits/infer",
        content=header + rows.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert "NaN" in _error(response, 400)


def test_binary_size_mismatch_is_400(digits_client: TestClient) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 256},
                }
            ]
        }
    ).encode()
    response = digits_client.post(
        "/v2/models/digits/infer",
        content=header + b"\0" * 100,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert "needs exactly 256 bytes" in _error(response, 400)


def test_bad_header_length_is_400(digits_client: TestClient) -> None:
    response = digits_client.post(
        "/v2/models/digits/infer", content=b"{}", headers={"Inference-Header-Content-Length": "99"}
    )
    assert "Inference-Header-Content-Length is 99" in _error(response, 400)


def test_empty_batch_is_400(digits_client: TestClient) -> None:
    body = {"inputs": [{"name": "pixels", "shape": [0, 64], "datatype": "FP32", "data": []}]}
    assert "empty batch" in _error(_post(digits_client, body), 400)


def test_malformed_json_is_400(digits_client: TestClient) -> None:
    response = digits_client.post("/v2/models/digits/infer", content=b'{"inputs": [')
    assert _error(response, 400).startswith("request body is not valid JSON")


def test_json_that_is_not_an_object_is_400(digits_client: TestClient) -> None:
    response = digits_client.post("/v2/models/digits/infer", content=b"[1, 2]")
    assert "expected an inference request object" in _error(response, 400)


def test_unknown_input_name_is_400(digits_client: TestClient) -> None:
    body = infer_body(X[:1])
    body["inputs"][0]["name"] = "image"  # type: ignore[index]
    message = _error(_post(digits_client, body), 400)
    assert message.startswith("unknown input 'image'; model 'digits' expects one input named")


def test_unknown_output_is_400(digits_client: TestClient) -> None:
    message = _error(_post(digits_client, infer_body(X[:1], outputs=[{"name": "nope"}])), 400)
    assert message.startswith(
        "unknown output 'nope'; model 'digits' serves ['embedding', 'probabilities', "
        "'score_max_probability'"
    )


def test_batch_over_limit_is_400(digits_client: TestClient) -> None:
    rows = np.zeros((1025, 64), dtype=np.float32)
    message = _error(_post(digits_client, infer_body(rows)), 400)
    assert "maximum batch size is 1024" in message


def test_body_over_limit_is_413(digits_client: TestClient) -> None:
    content = b" " * (16 * 1024 * 1024 + 1)
    message = _error(digits_client.post("/v2/models/digits/infer", content=content), 413)
    assert "exceeds the limit of 16777216 bytes" in message


def test_compressed_body_is_415(digits_client: TestClient) -> None:
    response = digits_client.post(
        "/v2/models/digits/infer", content=b"xx", headers={"Content-Encoding": "gzip"}
    )
    assert "not supported" in _error(response, 415)


def test_unknown_route_and_method(digits_client: TestClient) -> None:
    assert "no endpoint" in _error(digits_client.get("/v2/nothing/here"), 404)
    assert "not allowed" in _error(digits_client.get("/v2/models/digits/infer"), 405)
