"""Reference profiles: the split, the builder on the digits model, storage, the sha check."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from service.model_repository import ModelRepository
from service.onnx_classifier import SessionConfig
from service.reference_builder import (
    build_reference_profile,
    stratified_split,
    stratified_subsample,
)
from service.reference_data import ReferenceDataError, fit_to_model, read_reference_data
from service.reference_profile import REFERENCE_FILE, ReferenceMismatch, ReferenceProfile
from tests.support import MODELS_DIR

DIGITS = load_digits()


@pytest.fixture(scope="module")
def digits_model():  # type: ignore[no-untyped-def]
    return ModelRepository.from_directory(MODELS_DIR, SessionConfig()).get("digits")


def test_stratified_split_keeps_every_class_on_both_sides() -> None:
    strata = np.array([0] * 10 + [1] * 5 + [2] * 1)
    bank, holdout = stratified_split(strata, 0.2, np.random.default_rng(0))
    assert sorted(np.concatenate([bank, holdout]).tolist()) == list(range(16))
    assert np.bincount(strata[holdout], minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(strata[bank], minlength=3).tolist() == [8, 4, 1]


def test_stratified_subsample_keeps_shares() -> None:
    strata = np.array([0] * 80 + [1] * 20)
    chosen = stratified_subsample(np.arange(100), strata, 10, np.random.default_rng(0))
    assert np.bincount(strata[chosen]).tolist() == [8, 2]


def test_builder_on_digits(digits_model) -> None:  # type: ignore[no-untyped-def]
    inputs = DIGITS.data.astype(np.float32)
    profile = build_reference_profile(digits_model, inputs, DIGITS.target, seed=0)
    meta = profile.metadata
    assert meta["rows"] == 1797
    assert meta["bank_size"] + meta["holdout_size"] == 1797
    assert profile.embeddings.shape == (meta["bank_size"], 64)
    np.testing.assert_allclose(np.linalg.norm(profile.embeddings, axis=1), 1.0, rtol=1e-5)
    assert profile.k == 1  # default_k for a bank of about 1,400
    assert set(profile.score_distributions) == {"max_probability", "margin", "entropy", "novelty"}
    for values in profile.score_distributions.values():
        assert len(values) == meta["holdout_size"]
        assert (np.diff(values) >= 0).all()
    np.testing.assert_allclose(profile.class_prior, np.bincount(DIGITS.target) / 1797)
    assert profile.model_sha256 == digits_model.manifest.sha256
    assert meta["accuracy"] > 0.95


def test_profile_round_trips(digits_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    profile = build_reference_profile(digits_model, DIGITS.data[:300].astype(np.float32))
    profile.save(tmp_path / REFERENCE_FILE)
    loaded = ReferenceProfile.load(tmp_path / REFERENCE_FILE)
    assert loaded.k == profile.k
    assert loaded.metadata == profile.metadata
    np.testing.assert_array_equal(loaded.embeddings, profile.embeddings)
    for name, values in profile.score_distributions.items():
        np.testing.assert_array_equal(loaded.score_distributions[name], values)


def test_committed_digits_profile_matches_the_model(digits_model) -> None:  # type: ignore[no-untyped-def]
    profile = ReferenceProfile.load(MODELS_DIR / "digits" / REFERENCE_FILE)
    profile.check_model("digits", "1", digits_model.manifest.sha256)
    assert profile.metadata["labelled"] is True


def test_mismatched_profile_refuses_to_load(tmp_path: Path) -> None:
    target = tmp_path / "digits"
    shutil.copytree(MODELS_DIR / "digits", target, ignore=shutil.ignore_patterns("*.py"))
    profile = ReferenceProfile.load(target / REFERENCE_FILE)
    profile.model_sha256 = "f" * 64
    profile.save(target / REFERENCE_FILE)
    with pytest.raises(ReferenceMismatch, match=r"was built with a model whose sha256 is f{64}"):
        ModelRepository.from_directory(tmp_path, SessionConfig())


def test_reading_npz_csv_and_labels(tmp_path: Path) -> None:
    x = DIGITS.data[:5].astype(np.float32)
    np.savez(tmp_path / "ref.npz", X=x, y=DIGITS.target[:5])
    inputs, labels = read_reference_data(tmp_path / "ref.npz")
    np.testing.assert_array_equal(inputs, x)
    assert labels is not None and labels.tolist() == DIGITS.target[:5].tolist()

    header = ",".join([f"p{i}" for i in range(64)] + ["digit"])
    rows = [
        ",".join([*map(str, r), str(t)]) for r, t in zip(x.tolist(), DIGITS.target[:5], strict=True)
    ]
    (tmp_path / "ref.csv").write_text("\n".join([header, *rows]))
    inputs, labels = read_reference_data(tmp_path / "ref.csv", label_column="digit")
    np.testing.assert_array_equal(inputs, x)
    _, indices = fit_to_model(inputs, labels, [64], np.dtype(np.float32), list("0123456789"))
    assert indices is not None and indices.tolist() == DIGITS.target[:5].tolist()


def test_bad_reference_data_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ReferenceDataError, match=r"expected a \.npy, \.npz, \.csv or \.parquet"):
        (tmp_path / "x.json").write_text("{}")
        read_reference_data(tmp_path / "x.json")
    with pytest.raises(ReferenceDataError, match=r"the model expects instances of shape \[64\]"):
        fit_to_model(np.zeros((3, 10)), None, [64], np.dtype(np.float32), ["a"])
    with pytest.raises(ReferenceDataError, match=r"labels \['cat'\] are not class names"):
        fit_to_model(np.zeros((1, 2)), np.array(["cat"]), [2], np.dtype(np.float32), ["a", "b"])


def test_reference_build_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    np.savez(tmp_path / "train.npz", X=DIGITS.data[:1200], y=DIGITS.target[:1200])
    np.savez(tmp_path / "val.npz", X=DIGITS.data[1200:], y=DIGITS.target[1200:])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "reference",
            "build",
            "--model",
            "digits",
            "--model-dir",
            str(MODELS_DIR),
            "--data",
            str(tmp_path / "train.npz"),
            "--validation-data",
            str(tmp_path / "val.npz"),
            "--output",
            str(tmp_path / "ref.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "kNN bank of 1200 embeddings (k=1), score distributions from 597 held-out rows" in (
        result.stdout
    )
    profile = ReferenceProfile.load(tmp_path / "ref.npz")
    assert profile.metadata["holdout_source"] == "validation data"
    assert len(profile.score_distributions["novelty"]) == 597
