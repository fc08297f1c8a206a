"""``moelab data prepare|info|default``: tokenise text into training shards and inspect them."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="prepare token datasets and inspect them")
    data_sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = data_sub.add_parser(
        "prepare",
        help="tokenise .txt / JSONL / saved HF datasets into train/val token shards",
        description="Tokenise text into memmapped train/val token shards plus meta.json. "
        "Inputs: .txt files or directories of them (one document per file), JSONL files "
        "(.jsonl, .jsonl.gz), or directories written by datasets.save_to_disk.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files or directories")
    p.add_argument("-o", "--output", required=True, help="output directory (created)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or local HF tokenizer directory (default: shipped BPE)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "hf"],
                   help="input format (default: guessed from each path)")
    p.add_argument("--text-field", default="text", help="JSONL/HF field holding the text")
    p.add_argument("--domain-field", default="domain",
                   help="JSONL/HF field holding the domain label ('' to ignore)")
    p.add_argument("--domain", default="default", help="domain of documents without a label")
    p.add_argument("--domain-from-dir", action="store_true",
                   help="for .txt directories: label each file by its top-level subdirectory")
    p.add_argument("--hf-split", default=None, help="split of a saved DatasetDict (default train)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of documents held out for validation, per domain (0..1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"],
                   help="token id dtype (auto: uint16 when the vocabulary fits)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: only for large inputs)")
    p.set_defaults(func=run_prepare)

    p = data_sub.add_parser("info", help="print a prepared dataset's meta.json summary")
    p.add_argument("path", help="prepared dataset directory")
    p.add_argument("--json", action="store_true", help="print the full meta.json")
    p.set_defaults(func=run_info)

    p = data_sub.add_parser("default", help="build (first time) and print the default dataset")
    p.set_defaults(func=run_default)


def run_prepare(args: argparse.Namespace) -> int:
    from moelab.data import prepare

    out = prepare(
        args.inputs, args.output, tokenizer=args.tokenizer, format=args.format,
        text_field=args.text_field, domain_field=args.domain_field or None, domain=args.domain,
        domain_from_dir=args.domain_from_dir, hf_split=args.hf_split,
        val_fraction=args.val_fraction, seed=args.seed, dtype=args.dtype,
        overwrite=args.overwrite, progress=args.progress,
    )
    return run_info(argparse.Namespace(path=str(out), json=False))


def run_info(args: argparse.Namespace) -> int:
    from moelab.data import TokenDataset

    ds = TokenDataset(args.path)
    meta = ds.meta
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(f"dataset    {ds.path}")
    print(f"tokenizer  {meta['tokenizer']} (vocab {meta['vocab_size']}, {meta['dtype']})")
    print(f"{'split':<6} {'docs':>8} {'tokens':>12} {'unigram H':>10}  per domain (tokens)")
    for split in ("train", "val"):
        by_domain = ", ".join(f"{k}={v:,}" for k, v in meta["tokens_by_domain"][split].items())
        print(f"{split:<6} {meta['documents'][split]:>8,} {meta['tokens'][split]:>12,} "
              f"{meta['unigram_entropy_nats'][split]:>10.3f}  {by_domain}")
    return 0


def run_default(args: argparse.Namespace) -> int:
    from moelab.data import default_dataset_dir

    return run_info(argparse.Namespace(path=str(default_dataset_dir()), json=False))
