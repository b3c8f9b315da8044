"""``python -m ray_lit [ray_lit options] SCRIPT.py [script args]``: an unchanged Lightning
script on Ray.

For the script's run, ``import pytorch_lightning`` / ``lightning.pytorch`` resolve to ray_lit
(``ray_lit.compat``) and the options given before the script apply to every ``Trainer`` it
builds, over the script's own. Everything after ``SCRIPT.py`` is the script's: it sees
``sys.argv == [SCRIPT.py, *script args]`` and runs as ``__main__``, exactly as with
``python SCRIPT.py``.

Example::

    python -m ray_lit --workers 2 --storage-path /tmp/runs train.py --max_epochs 3

``python -m ray_lit consolidate SRC_DIR DST_FILE`` writes a sharded checkpoint directory
(``FSDPStrategy(state_dict_type="sharded")``) as one ordinary checkpoint file
(``ray_lit.checkpoint.sharded.consolidate``); a first argument ``consolidate`` selects it.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from typing import Any


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ray_lit",
        description="Run an unchanged PyTorch Lightning script with ray_lit: pytorch_lightning "
                    "and lightning.pytorch resolve to ray_lit, and these options apply to every "
                    "Trainer the script builds.",
        usage="python -m ray_lit [options] SCRIPT.py [script args]\n"
              "       python -m ray_lit consolidate SRC_DIR DST_FILE")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="Ray workers (DDP ranks) per Trainer; 0 trains in this process "
                             "(default: what the script asks for)")
    parser.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                        help="GPUs per worker; 0 trains on CPU (default: the script's choice)")
    parser.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                        help="CPUs Ray reserves per worker")
    parser.add_argument("--storage-path", default=None, metavar="DIR",
                        help="where run state and checkpoints live (local path or URI)")
    parser.add_argument("--max-failures", type=int, default=None, metavar="K",
                        help="worker-group restarts allowed before the run fails")
    parser.add_argument("--trainer-options", default=None, metavar="JSON",
                        help='any other Trainer options as a JSON object, e.g. '
                             '\'{"placement_strategy": "SPREAD"}\'')
    parser.add_argument("script", help="the Lightning script to run")
    parser.add_argument("script_args", nargs=argparse.REMAINDER,
                        help="arguments passed to the script unchanged")
    return parser


def trainer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run-scoped Trainer options the command line asks for.

    Raises:
        SystemExit: ``--trainer-options`` is not a JSON object (argparse-style message).
    """
    options: dict[str, Any] = {}
    if args.trainer_options:
        try:
            extra = json.loads(args.trainer_options)
        except json.JSONDecodeError as err:
            raise SystemExit(f"python -m ray_lit: --trainer-options is not JSON: {err}") from err
        if not isinstance(extra, dict):
            raise SystemExit("python -m ray_lit: --trainer-options must be a JSON object")
        options.update(extra)
    if args.workers is not None:
        options["num_workers"] = args.workers
    gpus = args.gpus_per_worker
    if gpus is not None:
        options["use_gpu"] = gpus > 0
    if (gpus is not None and gpus not in (0, 1)) or args.cpus_per_worker is not None:
        resources: dict[str, float] = {"CPU": args.cpus_per_worker or 1}
        if gpus:
            resources["GPU"] = gpus
        options["resources_per_worker"] = resources
    if args.storage_path is not None:
        options["storage_path"] = args.storage_path
    if args.max_failures is not None:
        options["max_failures"] = args.max_failures
    return options


def _consolidate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ray_lit consolidate",
        description="Write a sharded checkpoint directory (FSDPStrategy(state_dict_type="
                    "'sharded')) as one ordinary checkpoint file that load_from_checkpoint "
                    "and Trainer.fit(ckpt_path=...) read. Needs no GPU, Ray or process group.")
    parser.add_argument("src", metavar="SRC_DIR", help="the sharded checkpoint directory "
                                                        "(local path or storage URI)")
    parser.add_argument("dst", metavar="DST_FILE", help="the checkpoint file to write "
                                                        "(local path or storage URI)")
    return parser


def consolidate_main(argv: list[str]) -> None:
    """``python -m ray_lit consolidate SRC_DIR DST_FILE``.

    Raises:
        SystemExit: bad arguments, or the source cannot be consolidated (the message says why).
    """
    args = _consolidate_parser().parse_args(argv)
    from ray_lit.checkpoint.sharded import consolidate
    from ray_lit.errors import MisconfigurationException

    try:
        written = consolidate(args.src, args.dst)
    except (FileNotFoundError, MisconfigurationException) as err:
        raise SystemExit(f"python -m ray_lit consolidate: {err}") from err
    print(f"wrote {written}")


def main(argv: list[str] | None = None) -> None:
    """Parse ray_lit's options, install the Lightning aliases, run the script as ``__main__``
    (or consolidate a sharded checkpoint when the first argument is ``consolidate``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "consolidate":
        consolidate_main(argv[1:])
        return
    args = _parser().parse_args(argv)
    from ray_lit import compat

    compat.install(**trainer_options(args))
    sys.argv = [args.script, *args.script_args]
    # the script's folder first on sys.path, as `python SCRIPT.py` does
    import os

    script_dir = os.path.dirname(os.path.abspath(args.script))
    sys.path.insert(0, script_dir)
    # a Ray cluster this run starts inherits the environment: its workers import the
    # script's sibling modules as the script does
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (script_dir, os.environ.get("PYTHONPATH")) if p)
    try:
        runpy.run_path(args.script, run_name="__main__")
    finally:
        compat.uninstall()


if __name__ == "__main__":
    main()
