"""``python -m alexnet_train [COMMAND] ARGS``: every console script, without the script.

``COMMAND`` is ``train`` (the default, so ``python -m alexnet_train --config ...``
is ``alexnet-train``), ``eval``, ``summary``, ``prepare``, ``stats``, ``export``
``predict``, ``data`` or ``report``.  This is the form to give torchrun (``torchrun ... -m
alexnet_train ...``): it works where the console scripts are shell wrappers
(pyenv shims), which torchrun cannot run as Python.
"""
from __future__ import annotations

import sys
from typing import Sequence

from . import cli

COMMANDS = {
    "train": cli.train_main,
    "eval": cli.eval_main,
    "summary": cli.summary_main,
    "prepare": cli.prepare_main,
    "stats": cli.stats_main,
    "export": cli.export_main,
    "predict": cli.predict_main,
    "data": cli.data_main,
    "report": cli.report_main,
}


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS and COMMANDS[args[0]] is not cli.train_main:
        COMMANDS[args[0]](args[1:])
    else:  # as a program (argv None), the process exits when the run returns
        cli.train_main(args[1:] if args and args[0] == "train" else args, exiting=argv is None)


if __name__ == "__main__":
    main()
