"""``hm-recsys``: every pipeline stage as a subcommand.

The dispatcher imports nothing heavy: ``hm-recsys --help`` is instant and a
command only pays for the libraries it uses. Each stage module exposes
``main(argv: list[str] | None) -> int`` with its own argparse parser, so its
options are documented next to the code that uses them.

To add a stage, add one row to ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("hm_recsys.data.synthetic:main", "write a synthetic dataset in H&M's exact CSV format (+ oracle)"),
    "convert": ("hm_recsys.data.movielens:main", "write a public dataset (MovieLens-100k) as the three H&M files: a real dev set"),
    "ingest": ("hm_recsys.data.ingest:main", "load H&M CSVs or weekly drops into the Parquet warehouse"),
    "validate": ("hm_recsys.data.drops:main", "validate drops or the initial history with Great Expectations; quarantine rejects"),
    "evaluate": ("hm_recsys.evaluate:main", "score baselines (and the oracle) on a holdout week; print the comparison table"),
    "train": ("hm_recsys.train:main", "train the two towers on a time split; log the run to MLflow"),
    "retrain": ("hm_recsys.pipeline:retrain_main", "the whole retraining flow without Airflow: train, register, index, gate, promote"),
    "gate": ("hm_recsys.pipeline:gate_main", "judge a model version against the champion on a holdout week (and promote)"),
    "promote": ("hm_recsys.pipeline:promote_main", "promote a model version by hand (recorded reason)"),
    "rollback": ("hm_recsys.pipeline:rollback_main", "restore the previous champion"),
    "refresh": ("hm_recsys.pipeline:refresh_main", "rebuild and hot-swap the champion's served state as of the "
                                                   "newest week (no retraining); score the weeks it served"),
    "serve": ("hm_recsys.serving:main", "run the recommendation service (BentoML) on 127.0.0.1; hot-swaps the champion"),
    "deploy": ("hm_recsys.deploy:main", "build the Bento of a model version and switch the running service to it"),
}


def iso_date(text: str):
    """An argparse ``type`` for YYYY-MM-DD options, with a message naming the bad value."""
    import argparse
    import datetime as dt

    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date in YYYY-MM-DD form") from None


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    rows = "\n".join(f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items())
    return (
        "usage: hm-recsys <command> [options]\n\n"
        "Two-tower H&M recommender: every pipeline stage as a command.\n\n"
        f"commands:\n{rows}\n\n"
        "Run `hm-recsys <command> --help` for a command's options.\n"
        "Runtime state lives under $HM_RECSYS_HOME (default ./var)."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from hm_recsys import __version__

        print(f"hm-recsys {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hm-recsys: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
