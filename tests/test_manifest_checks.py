"""A manifest that disagrees with its graph stops the model from loading, with a clear message."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.errors import ManifestError, ModelLoadError
from service.manifest import Manifest, OutputRoles
from service.model_repository import ModelRepository
from service.onnx_classifier import SessionConfig
from tests.support import MODELS_DIR, REPO_ROOT

CONFIG = SessionConfig()


@pytest.fixture
def digits_copy(tmp_path: Path) -> Path:
    target = tmp_path / "repo" / "digits"
    shutil.copytree(MODELS_DIR / "digits", target, ignore=shutil.ignore_patterns("*.py"))
    return target


def edit_manifest(folder: Path, **changes: object) -> None:
    path = folder / "manifest.json"
    document = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = document
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(json.dumps(document))


def load(folder: Path) -> ModelRepository:
    return ModelRepository.from_directory(folder.parent, CONFIG)


def test_committed_digits_manifest_loads(digits_copy: Path) -> None:
    model = load(digits_copy).get("digits")
    assert model.class_names == [str(i) for i in range(10)]
    assert model.manifest.input_layout.kind == "image"


def test_sha256_mismatch_is_refused(digits_copy: Path) -> None:
    edit_manifest(digits_copy, sha256="0" * 64)
    with pytest.raises(
        ManifestError,
        match=r"model.onnx has sha256 [0-9a-f]{64} but the manifest "
        r"records 0{64}",
    ):
        load(digits_copy)


def test_missing_embedding_tensor_is_refused(digits_copy: Path) -> None:
    edit_manifest(digits_copy, outputs__embedding="no_such_tensor")
    with pytest.raises(ManifestError, match="embedding tensor 'no_such_tensor' is produced by no"):
        load(digits_copy)


def test_missing_scores_tensor_is_refused(digits_copy: Path) -> None:
    edit_manifest(digits_copy, outputs__probabilities="nope")
    with pytest.raises(ManifestError, match="scores tensor 'nope' is not in the graph"):
        load(digits_copy)


def test_wrong_input_name_is_refused(digits_copy: Path) -> None:
    edit_manifest(digits_copy, input__name="image")
    with pytest.raises(
        ManifestError,
        match=r"input 'image' is not an input of the graph; "
        r"graph inputs are \['pixels'\]",
    ):
        load(digits_copy)


def test_wrong_input_shape_is_refused(digits_copy: Path) -> None:
    edit_manifest(digits_copy, input__shape=[-1, 32])
    with pytest.raises(
        ManifestError,
        match=r"has shape \[-1, 64\] in the graph \(-1 = dynamic\) "
        r"but \[-1, 32\] in the manifest",
    ):
        load(digits_copy)


def test_wrong_input_datatype_is_refused(digits_copy: Path) -> None:
    edit_manifest(digits_copy, input__datatype="FP64")
    with pytest.raises(ManifestError, match="is FP32 in the graph but FP64 in the manifest"):
        load(digits_copy)


def test_class_count_mismatch_is_refused(digits_copy: Path) -> None:
    edit_manifest(digits_copy, class_names=["a", "b"])
    with pytest.raises(ManifestError, match=r"shape \[2, 10\] but the manifest lists 2 class"):
        load(digits_copy)


def test_invalid_manifest_names_the_field(digits_copy: Path) -> None:
    edit_manifest(digits_copy, name="../etc")
    with pytest.raises(ManifestError, match=r"manifest .* is invalid: name: String should match"):
        load(digits_copy)


def test_roles_need_exactly_one_score_source() -> None:
    with pytest.raises(ValidationError, match="exactly one of 'probabilities' or 'logits'"):
        OutputRoles(probabilities="p", logits="l")
    with pytest.raises(ValidationError, match="exactly one of 'probabilities' or 'logits'"):
        OutputRoles()


def test_manifest_round_trips(digits_copy: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(digits_copy / "manifest.json")
    manifest.save(tmp_path / "copy.json")
    assert Manifest.load(tmp_path / "copy.json") == manifest


def test_empty_repository_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no models found under"):
        ModelRepository.from_directory(tmp_path, CONFIG)


def test_duplicate_version_is_refused(digits_copy: Path) -> None:
    shutil.copytree(digits_copy, digits_copy.parent / "digits-again")
    with pytest.raises(ModelLoadError, match="model 'digits' version '1' is defined twice"):
        load(digits_copy)


def test_versions_in_subfolders_and_latest_is_default(digits_copy: Path) -> None:
    repo = digits_copy.parent
    for version in ("2", "10"):
        target = repo / "digits-versions" / version
        shutil.copytree(digits_copy, target)
        edit_manifest(target, version=version)
    shutil.rmtree(digits_copy)
    repository = ModelRepository.from_directory(repo, CONFIG)
    assert repository.versions("digits") == ["2", "10"]
    assert repository.get("digits").version == "10"
    assert repository.get("digits", "2").version == "2"


def test_serve_refuses_to_start_with_a_clear_message(digits_copy: Path) -> None:
    edit_manifest(digits_copy, sha256="1" * 64)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--model-dir",
            str(digits_copy.parent),
            "--port",
            "0",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "error: model 'digits' version '1'" in result.stderr
    assert "but the manifest records 1111" in result.stderr


def test_cli_help_lists_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for command in ("serve", "check", "manifest"):
        assert command in result.stdout
