"""The typed training config: ``Config`` = features + model + train + retrieval, from TOML and ``--set`` overrides.

``configs/two_tower.toml`` documents every option; ``load_config`` reads it
(or the dataclass defaults) and applies ``section.key=value`` overrides, and
every option's name and type is checked against the dataclasses, so a typo is
an error naming the option, never a silently ignored key. The resolved config
is saved with every model (``bundle``).
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hm_recsys.candidates import RetrievalConfig
from hm_recsys.features import FeatureConfig
from hm_recsys.model import ModelConfig

EARLY_STOPPING_METRICS = ("recall@12", "recall@100", "map@12", "ndcg@12")


@dataclass(frozen=True)
class TrainConfig:
    """Training options (the schema's training half).

    Attributes:
        train_weeks: weeks in the training window (before the validation week).
        epochs: maximum passes over the training window.
        batch_size: positives per batch (B); every batch comes from one week.
        temperature: softmax temperature tau on cosine scores.
        lr / sparse_lr: Adam learning rate of the dense weights / SparseAdam of the id tables.
        weight_decay: L2 on the dense weights (AdamW).
        uniform_negatives: extra negatives per batch drawn uniformly from the catalogue (M; 0 = in-batch only).
        logq_correction: subtract log Q (expected count in the candidate set) from each logit.
        mask_accidental_hits: mask other copies of a row's positive article among the candidates.
        mask_same_customer: mask the same customer's other purchases in the batch (they are positives too).
        id_dropout: probability of replacing a customer/article id with the OOV id during training,
            so the OOV embeddings (new customers, new articles) are trained.
        dedupe_week: count a customer's repeated purchases of an article within a week once.
        patience: epochs without improvement of ``early_stopping_metric`` before stopping.
        early_stopping_metric: validation metric to maximise.
        valid_weeks: validation weeks before the holdout (early stopping, fusion fit); 0 = the fewest
            (up to ``max_valid_weeks``) holding ``min_valid_customers`` buyers (``split.choose_valid_weeks``).
        max_valid_weeks: most weeks pooled by the automatic choice.
        min_valid_customers: scored customer-weeks early stopping needs; with fewer, all ``epochs`` run
            and the last epoch's weights are kept (a few customers must not pick the epoch).
        valid_max_customers: validation customers scored per epoch (a fixed random sample; 0 = all).
        eval_k: list length for Recall@K curves and recall@eval_k.
        exclude_purchased: drop already-purchased articles from model and baseline lists.
        seed: seeds data order, negatives, id dropout and initialisation.
        threads: torch intra-op threads.
    """

    train_weeks: int = 12
    epochs: int = 10
    batch_size: int = 2048
    temperature: float = 0.05
    lr: float = 0.002
    sparse_lr: float = 0.01
    weight_decay: float = 0.0
    uniform_negatives: int = 512
    logq_correction: bool = True
    mask_accidental_hits: bool = True
    mask_same_customer: bool = True
    id_dropout: float = 0.1
    dedupe_week: bool = True
    patience: int = 2
    early_stopping_metric: str = "recall@12"
    valid_weeks: int = 0
    max_valid_weeks: int = 2
    min_valid_customers: int = 1000
    valid_max_customers: int = 20000
    eval_k: int = 100
    exclude_purchased: bool = False
    seed: int = 42
    threads: int = 2

    def __post_init__(self) -> None:
        for k in ("train_weeks", "epochs", "batch_size", "patience", "threads", "max_valid_weeks"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        if self.valid_weeks < 0 or self.min_valid_customers < 0:
            raise ValueError("train.valid_weeks and train.min_valid_customers must be >= 0")
        if self.batch_size < 2:
            raise ValueError("train.batch_size must be >= 2 (in-batch negatives need company)")
        if self.temperature <= 0:
            raise ValueError(f"train.temperature must be > 0, got {self.temperature}")
        if self.uniform_negatives < 0 or self.valid_max_customers < 0:
            raise ValueError("train.uniform_negatives and train.valid_max_customers must be >= 0")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"train.id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.early_stopping_metric not in EARLY_STOPPING_METRICS:
            raise ValueError(f"train.early_stopping_metric must be one of {EARLY_STOPPING_METRICS}")
        if self.eval_k < 12:
            raise ValueError(f"train.eval_k must be >= 12, got {self.eval_k}")


@dataclass(frozen=True)
class Config:
    """The whole schema: features, model, training and retrieval options. Saved with every model."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"features": self.features.to_dict(), "model": self.model.to_dict(),
                "train": dataclasses.asdict(self.train), "retrieval": self.retrieval.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> Config:
        unknown = set(d) - {"features", "model", "train", "retrieval"}
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {sorted(unknown)}; sections: features, model, train, "
                             f"retrieval")
        feats = _checked(FeatureConfig, d.get("features", {}), f"{where} [features]")
        model = _checked(ModelConfig, d.get("model", {}), f"{where} [model]")
        train = _checked(TrainConfig, d.get("train", {}), f"{where} [train]")
        retrieval = _checked(RetrievalConfig, d.get("retrieval", {}), f"{where} [retrieval]")
        try:
            return cls(FeatureConfig.from_dict(feats), ModelConfig.from_dict(model), TrainConfig(**train),
                       RetrievalConfig.from_dict(retrieval))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def _checked(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check option names and value types against ``cls``'s annotations; ints are accepted as floats."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a table of options, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, v in values.items():
        if k not in fields:
            raise ValueError(f"{where}: unknown option {k!r}; known: {sorted(fields)}")
        hint = hints[k]
        origin = typing.get_origin(hint)
        ok: bool
        if hint is bool:
            ok = isinstance(v, bool)
        elif hint is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif hint is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            v = float(v) if ok else v
        elif hint is str:
            ok = isinstance(v, str)
        elif origin is tuple:
            ok = isinstance(v, (list, tuple))
            (inner, *_) = typing.get_args(hint) or (Any,)
            if ok and inner in (int, str):
                ok = all(isinstance(x, inner) and not isinstance(x, bool) for x in v)
            v = tuple(v) if ok else v
        elif origin in (Mapping, dict, typing.Mapping) or hint is Mapping:
            ok = isinstance(v, Mapping)
        else:
            ok = True
        if not ok:
            raise ValueError(f"{where}: option {k!r} must be {getattr(hint, '__name__', hint)}, got {v!r}")
        out[k] = v
    if cls is ModelConfig:
        resolved = [k for k in ("customer", "article", "history") if k in out and out[k] and
                    not isinstance(next(iter(out[k])), Mapping)]
        if resolved:
            raise ValueError(f"{where}: {resolved} are set from [features], not [model]")
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> ``(["train", "epochs"], 3)``; the value is read as TOML, else as a bare string."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p.strip() for p in key.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise ValueError(f"--set {text!r}: the key must name a section and an option, e.g. train.epochs=3")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def load_config(path: Path | str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Config from a TOML file (default: the dataclass defaults) with ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {text!r}: {k!r} is not a table")
        node[keys[-1]] = value
    return Config.from_dict(data, where=where + (" + --set" if overrides else ""))
