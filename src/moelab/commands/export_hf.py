"""``moelab export-hf RUN_DIR OUT_DIR``: a run as a ``transformers`` directory (docs/hf.md)."""

from __future__ import annotations

import argparse

from moelab.commands import add_checkpoint_option

DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-hf",
        help="export a run for transformers (AutoModelForCausalLM, trust_remote_code=True)",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    add_checkpoint_option(p)
    p.add_argument(
        "--dtype", choices=DTYPES, default=None, help="cast the weights (default: as trained)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in OUT_DIR (only its files; other files are refused)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moelab.hf import export_run

    out = export_run(
        args.run_dir,
        args.out_dir,
        checkpoint=args.checkpoint,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        overwrite=args.overwrite,
    )
    print(f"exported {args.run_dir} to {out}")
    print(
        f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)"
    )
    return 0
