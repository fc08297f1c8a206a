"""``moelab data prepare|info|default``: tokenise text into training shards and inspect them."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="prepare token datasets and inspect them")
    data_sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = data_sub.add_parser(
        "prepare",
        help="tokenise text files / JSONL / saved HF datasets into train/val token shards",
        description="Tokenise text into memmapped train/val token shards plus meta.json. "
        "Inputs: text files or directories of them (one document per file; common text and "
        "code extensions by default, see --extensions), JSONL files (.jsonl, .jsonl.gz), or "
        "directories written by datasets.save_to_disk.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files or directories")
    p.add_argument("-o", "--output", required=True, help="output directory (created)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or local HF tokenizer directory (default: shipped BPE)",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "text", "jsonl", "hf"],
        help="input format (default: guessed from each path)",
    )
    p.add_argument("--text-field", default="text", help="JSONL/HF field holding the text")
    p.add_argument(
        "--domain-field",
        default="domain",
        help="JSONL/HF field holding the domain label ('' to ignore)",
    )
    p.add_argument("--domain", default="default", help="domain of documents without a label")
    p.add_argument(
        "--domain-from-dir",
        action="store_true",
        help="for text directories: label each file by its top-level subdirectory",
    )
    p.add_argument(
        "--extensions",
        default=None,
        metavar=".EXT,...",
        help="comma-separated file extensions a text directory contributes, e.g. "
        ".py,.md (default: common text, markup, code and config extensions: "
        ".txt .md .rst .py .c .h .cpp .js .ts .java .go .rs .json .yaml .toml "
        ".html .tex .csv .sh ...)",
    )
    p.add_argument("--hf-split", default=None, help="split of a saved DatasetDict (default train)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="fraction of documents held out for validation, per domain (0..1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "uint16", "uint32"],
        help="token id dtype (auto: uint16 when the vocabulary fits)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier prepared dataset there (refused for anything else)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: only for large inputs)",
    )
    p.set_defaults(func=run_prepare)

    p = data_sub.add_parser("info", help="print a prepared dataset's meta.json summary")
    p.add_argument("path", help="prepared dataset directory")
    p.add_argument("--json", action="store_true", help="print the full meta.json")
    p.set_defaults(func=run_info)

    p = data_sub.add_parser("default", help="build (first time) and print the default dataset")
    p.set_defaults(func=run_default)


def run_prepare(args: argparse.Namespace) -> int:
    from moelab.data import TokenDataset, prepare

    out = prepare(
        args.inputs,
        args.output,
        tokenizer=args.tokenizer,
        format=args.format,
        text_field=args.text_field,
        domain_field=args.domain_field or None,
        domain=args.domain,
        domain_from_dir=args.domain_from_dir,
        hf_split=args.hf_split,
        val_fraction=args.val_fraction,
        seed=args.seed,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=args.progress,
        extensions=args.extensions,
    )
    print_sources(TokenDataset(out).meta)
    return run_info(argparse.Namespace(path=str(out), json=False))


def print_sources(meta: dict) -> None:
    """Per directory input, the files taken and skipped by extension: a kind of file left out
    (say, 250 .py files) must show, not vanish from the dataset."""
    from moelab.data.sources import count_summary

    for source in meta.get("source", []):
        if "files_by_extension" not in source:
            continue
        line = f"input      {source['path']}: took {source['files']:,} files "
        line += f"({count_summary(source['files_by_extension'])})"
        skipped = source["skipped_by_extension"]
        if skipped:
            line += f"; skipped {sum(skipped.values()):,} ({count_summary(skipped)})"
        if source.get("skipped_hidden"):
            line += f"; ignored {source['skipped_hidden']:,} under hidden directories"
        print(line)


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
        print(
            f"{split:<6} {meta['documents'][split]:>8,} {meta['tokens'][split]:>12,} "
            f"{meta['unigram_entropy_nats'][split]:>10.3f}  {by_domain}"
        )
    return 0


def run_default(args: argparse.Namespace) -> int:
    from moelab.data import default_dataset_dir

    return run_info(argparse.Namespace(path=str(default_dataset_dir()), json=False))
