"""``hm-recsys train`` and the training API, as callers import it (``from hm_recsys import train``).

The code lives in ``hm_recsys.training``, one job a module, read top to
bottom: ``run`` (the MLflow run, the CLI) -> ``fit`` (loss, epochs, early
stopping, fusion) -> ``dataset`` (warehouse -> shards and batches), with
``config`` (the typed config) and ``optim`` (the fused loss and sparse Adam) beside them. This module only hands their
names on.
"""

from __future__ import annotations

from hm_recsys.training.config import EARLY_STOPPING_METRICS, Config, TrainConfig, load_config, parse_override
from hm_recsys.training.dataset import Batch, Prepared, ValidWeek, fingerprint, iterate_batches, prepare
from hm_recsys.training.epochs import EpochLog
from hm_recsys.training.fit import (
    build_model,
    corrected_logits,
    early_stopping,
    equal_pairs,
    evaluate_valid,
    fit,
    fit_fusion,
    in_batch_softmax_loss,
    make_optimizers,
    rank,
    recommender,
    train_epoch,
    train_step,
    training_kernels,
)
from hm_recsys.training.run import (
    HOLDOUT_BY_CALLER,
    MODEL_NAME,
    SERVED,
    TrainResult,
    holdout_models,
    main,
    resolve_split,
    run_training,
)

__all__ = [
    "EARLY_STOPPING_METRICS",
    "HOLDOUT_BY_CALLER",
    "MODEL_NAME",
    "SERVED",
    "Batch",
    "Config",
    "EpochLog",
    "Prepared",
    "TrainConfig",
    "TrainResult",
    "ValidWeek",
    "build_model",
    "corrected_logits",
    "early_stopping",
    "equal_pairs",
    "evaluate_valid",
    "fingerprint",
    "fit",
    "fit_fusion",
    "holdout_models",
    "in_batch_softmax_loss",
    "iterate_batches",
    "load_config",
    "main",
    "make_optimizers",
    "parse_override",
    "prepare",
    "rank",
    "recommender",
    "resolve_split",
    "run_training",
    "train_epoch",
    "train_step",
    "training_kernels",
]
