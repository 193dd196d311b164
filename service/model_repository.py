"""The model repository: every folder under the model directory that holds a manifest.

Two layouts are accepted, so a repository can grow versions without moving files:
`<model_dir>/<model>/manifest.json` and `<model_dir>/<model>/<version>/manifest.json`.
The manifest, not the folder name, says what the model and version are called.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterator
from pathlib import Path

from service.errors import ModelLoadError, ModelNotFound
from service.manifest import MANIFEST_FILE, Manifest
from service.onnx_classifier import OnnxClassifier, SessionConfig
from service.reference_profile import REFERENCE_FILE, ReferenceProfile


def version_key(version: str) -> tuple[int, ...] | tuple[float, str]:
    """Numeric versions sort numerically and above any non-numeric one."""
    if re.fullmatch(r"\d+(\.\d+)*", version):
        return (1, *(int(p) for p in version.split(".")))
    return (0, version)


def _manifest_paths(model_dir: Path) -> list[Path]:
    if not model_dir.is_dir():
        raise ModelLoadError(
            f"model directory {model_dir} does not exist; set EDGEHARVEST_MODEL_DIR to a "
            "folder holding one sub-folder per model with a manifest.json"
        )
    manifests = sorted(
        {*model_dir.glob(f"*/{MANIFEST_FILE}"), *model_dir.glob(f"*/*/{MANIFEST_FILE}")}
    )
    if not manifests:
        raise ModelLoadError(
            f"no models found under {model_dir}: expected sub-folders with a "
            f"{MANIFEST_FILE} (generate one with `edgeharvest manifest propose MODEL.onnx`)"
        )
    return manifests


def _checked_reference(directory: Path, manifest: Manifest) -> ReferenceProfile | None:
    """The reference profile beside a manifest, checked against its model; None if absent."""
    path = directory / REFERENCE_FILE
    if not path.is_file():
        return None
    profile = ReferenceProfile.load(path)
    profile.check_model(manifest.name, manifest.version, manifest.sha256)
    return profile


def _load_models(
    found: list[tuple[Path, Manifest]], config: SessionConfig, *, load_references: bool = True
) -> tuple[list[OnnxClassifier], dict[tuple[str, str], ReferenceProfile]]:
    """Load and warm up each manifest's model, with its checked reference profile."""
    models = [OnnxClassifier(manifest, path.parent, config) for path, manifest in found]
    references = {}
    for (path, manifest), model in zip(found, models, strict=True):
        profile = _checked_reference(path.parent, manifest) if load_references else None
        if profile is not None:
            references[(model.name, model.version)] = profile
    return models, references


class ModelRepository:
    def __init__(
        self,
        models: list[OnnxClassifier],
        references: dict[tuple[str, str], ReferenceProfile] | None = None,
    ) -> None:
        # Reference profiles by (name, version); a model without one serves unscored percentiles.
        self.references = references or {}
        self._models: dict[str, dict[str, OnnxClassifier]] = {}
        for model in models:
            versions = self._models.setdefault(model.name, {})
            if model.version in versions:
                raise ModelLoadError(
                    f"model '{model.name}' version '{model.version}' is defined twice: "
                    f"in {versions[model.version].directory} and in {model.directory}"
                )
            versions[model.version] = model
        self._latest = {
            name: versions[max(versions, key=version_key)]
            for name, versions in self._models.items()
        }

    @staticmethod
    def find_manifests(model_dir: Path) -> list[Manifest]:
        """Every manifest in the repository, validated but without loading any model."""
        return [Manifest.load(p) for p in _manifest_paths(model_dir)]

    @staticmethod
    def find_references(
        model_dir: Path, known: Container[tuple[str, str]] = ()
    ) -> list[tuple[Manifest, ReferenceProfile | None]]:
        """Every manifest with its checked reference profile (None if it has none), without
        loading any model: what the workers need. Versions in `known` ((name, version)) are
        left out, so a worker looking for new ones loads no profile twice."""
        found = []
        for path in _manifest_paths(model_dir):
            manifest = Manifest.load(path)
            if (manifest.name, manifest.version) not in known:
                found.append((manifest, _checked_reference(path.parent, manifest)))
        return found

    @staticmethod
    def load_versions(
        model_dir: Path, name: str, config: SessionConfig
    ) -> tuple[list[OnnxClassifier], dict[tuple[str, str], ReferenceProfile]]:
        """Load (and warm up) every version of one model from disk, with its checked reference.

        Raises ModelNotFound when no manifest names the model, ModelLoadError when one cannot be
        served; nothing already served is touched.
        """
        found = [(p, Manifest.load(p)) for p in _manifest_paths(model_dir)]
        found = [(p, m) for p, m in found if m.name == name]
        if not found:
            raise ModelNotFound(f"no manifest under {model_dir} names a model '{name}'")
        return _load_models(found, config)

    def replace(
        self,
        name: str,
        models: list[OnnxClassifier],
        references: dict[tuple[str, str], ReferenceProfile],
    ) -> list[OnnxClassifier]:
        """Serve `models` as every version of `name` from now on; returns the ones replaced.

        One synchronous step, so on the event loop no request sees half of it; requests already
        holding an old model finish on it.
        """
        replaced = list(self._models.get(name, {}).values())
        versions = {m.version: m for m in models}
        self._models[name] = versions
        self._latest[name] = versions[max(versions, key=version_key)]
        for model in replaced:
            self.references.pop((model.name, model.version), None)
        self.references.update(references)
        return replaced

    @classmethod
    def from_directory(
        cls, model_dir: Path, config: SessionConfig, *, load_references: bool = True
    ) -> ModelRepository:
        found = [(p, Manifest.load(p)) for p in _manifest_paths(model_dir)]
        models, references = _load_models(found, config, load_references=load_references)
        return cls(models, references)

    def __iter__(self) -> Iterator[OnnxClassifier]:
        for versions in self._models.values():
            yield from versions.values()

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        return sorted(self._versions_of(name), key=version_key)

    def get(self, name: str, version: str | None = None) -> OnnxClassifier:
        if version is None:
            latest = self._latest.get(name)
            if latest is None:
                self._versions_of(name)  # raises ModelNotFound
            return latest  # type: ignore[return-value]
        versions = self._versions_of(name)
        try:
            return versions[version]
        except KeyError:
            raise ModelNotFound(
                f"model '{name}' has no version '{version}'; available versions: "
                f"{sorted(versions, key=version_key)}"
            ) from None

    def _versions_of(self, name: str) -> dict[str, OnnxClassifier]:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(
                f"unknown model '{name}'; this server serves {self.names}"
            ) from None
