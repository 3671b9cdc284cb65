"""Training the two towers, one job a module; data flows one way, top to bottom.

* ``run``: one run, logged to MLflow (``run_training``), and the CLI
  (``hm-recsys train``). The only module that imports ``hm_recsys.tracking``.
* ``fit``: the loss, the epoch loop with early stopping, the fusion's fit.
* ``dataset``: warehouse -> weekly example shards, fitted features,
  validation weeks; the batches read back from the shards.
* ``config``: the typed config (``Config``, ``TrainConfig``, ``load_config``).
* ``epochs``: ``EpochLog``, what ``fit`` reports per epoch and ``tracking`` logs.

``run`` -> ``fit`` -> ``dataset``; each may use ``config`` and ``epochs``,
none imports a module above it. Callers import ``hm_recsys.train``, which
hands these modules' names on.
"""
