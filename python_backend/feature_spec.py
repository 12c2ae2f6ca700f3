"""Feature spec and model metadata written next to every model version.

A model version directory holds:

* ``feature_spec.json`` - the ordered input features (name, group, dtype, default, valid range)
  and which entity each online group is keyed by. The feature assembler builds vectors from it.
* ``training_stats.json`` - per-feature quantiles/histogram and the class prior, used by the
  fallback and by drift monitoring.
* ``metadata.json`` - model kind, decision threshold, class names, tensor names and golden
  examples (inputs with the expected probabilities) for smoke tests after a load.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FEATURE_SPEC_FILE = "feature_spec.json"
TRAINING_STATS_FILE = "training_stats.json"
METADATA_FILE = "metadata.json"

FeatureGroup = Literal["user", "merchant", "context"]
#: Groups fetched from the online store; ``context`` features come with the request.
ONLINE_GROUPS: tuple[FeatureGroup, ...] = ("user", "merchant")


class FeatureDef(BaseModel):
    """One model input feature."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    group: FeatureGroup
    dtype: Literal["float32"] = "float32"
    default: float
    min: float
    max: float

    @model_validator(mode="after")
    def _check_range(self) -> FeatureDef:
        if not self.min <= self.default <= self.max:
            raise ValueError(f"default of {self.name} must lie in [{self.min}, {self.max}]")
        return self


class FeatureSpec(BaseModel):
    """Ordered features of a model version; the vector layout the model was trained on."""

    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = 1
    features: list[FeatureDef] = Field(min_length=1)
    #: online group -> request field holding its entity id (user -> user_id)
    entity_keys: dict[FeatureGroup, str] = Field(
        default_factory=lambda: {"user": "user_id", "merchant": "merchant_id"}
    )

    @model_validator(mode="after")
    def _unique_names(self) -> FeatureSpec:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        return self

    @property
    def n_features(self) -> int:
        return len(self.features)

    @cached_property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def indices(self, group: FeatureGroup) -> list[int]:
        """Positions in the vector of the features of ``group``, in spec order."""
        return [i for i, f in enumerate(self.features) if f.group == group]

    def group_features(self, group: FeatureGroup) -> list[FeatureDef]:
        return [f for f in self.features if f.group == group]

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")


class GoldenExample(BaseModel):
    """A model input with the probability the exported artifact must produce for it."""

    inputs: list[float]
    probability: float


class ModelMetadata(BaseModel):
    """What serving needs to know about a model version beyond its artifact."""

    model_name: str
    version: int = Field(ge=1)
    kind: Literal["xgboost", "mlp", "logistic_regression"]
    #: artifact files in the version directory, e.g. {"onnx": "model.onnx"}
    artifacts: dict[str, str]
    input_name: str = "input__0"
    output_name: str = "output__0"
    n_features: int = Field(ge=1)
    class_names: list[str] = Field(default_factory=lambda: ["legit", "fraud"])
    #: decision threshold on the positive-class probability
    threshold: float = Field(gt=0.0, lt=1.0)
    metrics: dict[str, float] = Field(default_factory=dict)
    golden: list[GoldenExample] = Field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> ModelMetadata:
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")


class FeatureStats(BaseModel):
    """Training distribution of one feature."""

    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[str, float]
    histogram_edges: list[float]
    histogram_counts: list[int]


class TrainingStats(BaseModel):
    """Training-set statistics of a model version."""

    n_rows: int
    #: share of the positive class in training data; the last-resort fallback score
    class_prior: float = Field(ge=0.0, le=1.0)
    features: dict[str, FeatureStats]

    @classmethod
    def load(cls, path: str | Path) -> TrainingStats:
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(), indent=2) + "\n")
