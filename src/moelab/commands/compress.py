"""``moelab compress RUN_DIR OUT_RUN_DIR --method METHOD [--ratio R] [method options]``.

The methods and their options come from :mod:`moelab.compress.methods` (each method adds its own
options with ``add_arguments``); an option of a method other than the chosen one is refused in
one line, so a mistyped command never runs with an option silently ignored.
"""

from __future__ import annotations

import argparse

from moelab.commands import (
    add_new_run_parser,
    check_new_run_args,
    config_overrides,
    print_new_run,
)
from moelab.compress.methods import get_method, method_names


def register(sub: argparse._SubParsersAction) -> None:
    p = add_new_run_parser(
        sub,
        "compress",
        source="RUN_DIR",
        output="OUT_RUN_DIR",
        help="compress a run's MoE layers (pruning, merging, quantization) into a new run",
        description="Compress a run's checkpoint with METHOD and write the result as a new run "
        "at step 0 (evaluate it like any run; continue it with `moelab train --resume "
        "OUT_RUN_DIR`). Methods: "
        + "; ".join(f"{n}: {get_method(n).summary}" for n in method_names())
        + ". Calibration tokens are training-split batches of the run's data (or --calib-data), "
        "never the validation split the new run is evaluated on. "
        "The provenance of the new run records the method, its options, each layer's experts, "
        "parameters and bytes before and after. Overrides (KEY=VALUE) set data/optim/train/"
        "logging/checkpoint fields. See docs/compress.md.",
        run=run,
        options=_options,
        from_run=True,
    )
    p.set_defaults(method_options=_method_options(p))


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=method_names(), help="the method")
    p.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="fraction of the expert parameters kept, in (0, 1) (methods that take one)",
    )
    p.add_argument(
        "--calib-batches",
        type=int,
        default=16,
        help="training-split batches the method calibrates on (default 16)",
    )
    p.add_argument(
        "--calib-data",
        default=None,
        metavar="PATH",
        help="a prepared dataset (moelab data prepare, the run's tokenizer) whose training "
        "split calibrates, instead of the run's own data",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the method's random numbers")


def _method_options(p: argparse.ArgumentParser) -> dict[str, dict[str, argparse.Action]]:
    """Each method's options in a group of its own: ``method → {dest: action}``. Their defaults
    are suppressed on the parser, so the options given are those present in the namespace (the
    method fills its defaults itself, :meth:`CompressMethod.resolve_options`)."""
    owned: dict[str, dict[str, argparse.Action]] = {}
    for name in method_names():
        group = p.add_argument_group(f"--method {name} options")
        before = len(p._actions)
        try:
            get_method(name).add_arguments(group)  # type: ignore[arg-type]
        except argparse.ArgumentError as err:  # a method's flag clashes with another's
            raise ValueError(f"compress method {name!r}: {err}") from None
        owned[name] = {a.dest: a for a in p._actions[before:]}
        for action in owned[name].values():
            action.default = argparse.SUPPRESS
    return owned


def run(args: argparse.Namespace) -> int:
    from moelab.compress import compress_run

    options = {}
    for name, actions in args.method_options.items():
        for dest, action in actions.items():
            if not hasattr(args, dest):
                continue
            if name != args.method:
                flag = "/".join(action.option_strings) or dest
                raise ValueError(
                    f"{flag}: an option of --method {name}, not of --method {args.method}"
                )
            options[dest] = getattr(args, dest)
    check_new_run_args(args)  # before any work: never the source run or a folder of other files
    ckpt, outcome = compress_run(
        args.source,
        args.output,
        args.method,
        args.ratio,
        options,
        calib_batches=args.calib_batches,
        calib_data=args.calib_data,
        checkpoint=args.checkpoint,
        overrides=config_overrides(args),
        overwrite=args.overwrite,
        seed=args.seed,
    )
    for c in outcome.layers:
        print(
            f"block {c.block}: experts {c.experts_before} -> {c.experts_after}, params "
            f"{c.params_before:,} -> {c.params_after:,}, bytes {c.bytes_before:,} -> "
            f"{c.bytes_after:,}"
        )
    from moelab.train import load_run_config

    why = load_run_config(args.output).model.ffn.untrainable()
    print_new_run(
        f"compressed ({args.method})",
        args.source,
        args.output,
        ckpt.name,
        untrainable=None if why is None else f"model.ffn.{why[0]} {why[1]}",
    )
    return 0
