"""An unchanged, widely used OIP client (Triton's HTTP client) against the real server process."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from sklearn.datasets import load_digits

X = load_digits().data.astype(np.float32)


@pytest.fixture(scope="module")
def client(live_server: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=live_server.removeprefix("http://"))


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("digits")
    assert metadata["inputs"][0]["name"] == "pixels"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_in_both_modes(client: httpclient.InferenceServerClient, binary: bool) -> None:
    rows = X[:16]
    tensor = httpclient.InferInput("pixels", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("embedding", binary_data=binary),
    ]
    result = client.infer("digits", [tensor], outputs=outputs, request_id="abc")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (16, 10)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert result.as_numpy("embedding").shape[0] == 16
    assert result.get_response()["id"] == "abc"


def test_binary_and_json_modes_agree(client: httpclient.InferenceServerClient) -> None:
    rows = X[100:104]
    results = []
    for binary in (True, False):
        tensor = httpclient.InferInput("pixels", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows, binary_data=binary)
        result = client.infer("digits", [tensor], model_version="1")
        results.append(result.as_numpy("probabilities"))
    np.testing.assert_array_equal(results[0], results[1])


def test_client_sees_server_errors(client: httpclient.InferenceServerClient) -> None:
    tensor = httpclient.InferInput("pixels", [1, 60], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 60), dtype=np.float32))
    with pytest.raises(httpclient.InferenceServerException, match=r"expected \[-1, 64\]"):
        client.infer("digits", [tensor])
