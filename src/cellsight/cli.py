"""The ``cellsight`` command line: ``cellsight demo``, ... (one argparse sub-command each).

Adding a sub-command: write ``_add_<name>(subparsers)`` that creates its parser with
``subparsers.add_parser(...)`` and sets ``func=<function(args) -> int>`` with
``set_defaults``, then append it to :data:`SUBCOMMANDS` (see the marked section below).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser", "SUBCOMMANDS"]


# ---------------------------------------------------------------------------------------------
# cellsight demo
# ---------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    from cellsight.demo import run_demo

    steps = None if args.steps is None else [s.strip() for s in args.steps.split(",") if s.strip()]
    ctx = run_demo(
        out=args.out,
        max_epochs=args.max_epochs,
        quick=args.quick,
        seed=args.seed,
        steps=steps,
        progress_bar=not args.no_progress,
    )
    print(
        f"cellsight demo: wrote {', '.join(name for name, _ in ctx.files)} and report.md "
        f"to {args.out}"
    )
    return 0


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    from cellsight.demo.steps import step_names

    p = subparsers.add_parser(
        "demo",
        help="train models on bundled data and write figures and a report",
        description=(
            "Train scVI on the bundled PBMC counts (700 cells) and write demo_out/latent.h5ad, "
            "demo_out/scvi_umap_loss.png and demo_out/report.md. A few minutes on 2 CPU cores."
        ),
    )
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="training epochs of each step (default: the step's own)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a few epochs only: a smoke test, not results"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--steps",
        default=None,
        metavar="NAMES",
        help=f"comma-separated steps to run (default: all of {','.join(step_names())})",
    )
    p.add_argument("--no-progress", action="store_true", help="hide training progress bars")
    p.set_defaults(func=_run_demo)


# ---------------------------------------------------------------------------------------------
# cellsight fit
# ---------------------------------------------------------------------------------------------
def _run_fit(args: argparse.Namespace) -> int:
    from cellsight.cli_fit import main as fit_main

    return fit_main(list(args.fit_args))


def _add_fit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit",
        add_help=False,
        help="fit a streaming statistic (mean_var, tdigest, hvg, ipca, ppca) from a config",
        description=(
            "cellsight fit MODEL --config x.yaml [--print_config] [--key value ...]: stream "
            "shards through transforms into a statistic and write its table; runs chain "
            "through files. `cellsight fit MODEL --help` lists a model's options."
        ),
    )
    p.add_argument("fit_args", nargs=argparse.REMAINDER, help="MODEL and its options")
    p.set_defaults(func=_run_fit)


# ---------------------------------------------------------------------------------------------
# Sub-commands register here: append an ``_add_<name>(subparsers)`` function (see above).
# ---------------------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo,
    _add_fit,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``cellsight`` argument parser with every registered sub-command."""
    from cellsight import __version__

    parser = argparse.ArgumentParser(
        prog="cellsight",
        description="Interpretable, causal and scalable deep learning for single-cell omics.",
    )
    parser.add_argument("--version", action="version", version=f"cellsight {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellsight`` console script.

    Parameters
    ----------
    argv
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    Exit status: 0 on success, 2 for a usage error, 1 when a command rejects its input.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "fit":
        # everything after `fit` belongs to the jsonargparse parser of cellsight.cli_fit
        args = argparse.Namespace(command="fit", func=_run_fit, fit_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"cellsight {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
