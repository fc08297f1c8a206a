"""expert offloading: decode tokens/s, hit rate and bytes read at several budgets, vs fully loaded

The model (:mod:`moelab.bench.offload_models`) is either the ``topk-tiny`` preset with
``--experts`` experts per layer (default 64), random init (routing untrained: no locality learnt,
and its greedy text from a random prompt soon repeats), written once to a temporary safetensors
file; or, with ``--run RUN_DIR [--checkpoint N]``, a trained run's own model and experts, served
from its checkpoint file, prompted with the start of its validation split. For each budget (a
share of all experts' bytes) and policy (``lru``, ``lfu``, ``prefetch`` = LRU plus next-router
prefetch) a fresh model is offloaded, the prompt is prefilled, the counters are reset and
``--tokens`` tokens are decoded greedily; the fully loaded model decodes the same tokens in the
same process, its runs interleaved with the others so that machine load hits all alike. Median
and range over ``--repeats`` rounds; every plain offloaded run must decode the loaded tokens.

``--miss-precision int8|int4`` adds, at each budget and policy, a row for the same offloaded model
with HOBBIT's low-precision copies (:mod:`moelab.serve.lowprec`, ``--miss-threshold``); a budget
that cannot hold the copies is shown refused with the reason. Those rows decode the loaded
model's tokens teacher-forced (their own greedy tokens may differ), so every row's logits can be
compared with the loaded model's step by step (max abs difference, top-1 agreement). With
``--run``, every variant is also scored on ``--nll-windows`` validation windows (``--prompt-len``
prompt, ``--tokens`` true tokens teacher-forced, :mod:`moelab.eval.continuation`, each on a fresh
offloaded model after the timed rounds): the NLL with and without the low-precision misses.
``--top-k`` (the preset's 1 by default) gives the random-init model a second expert per token,
which the copies need (HOBBIT's rule compares a gate with the token's top one).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moelab.serve.options import add_read_workers_argument, check_read_workers

POLICIES = {"lru": ("lru", False), "lfu": ("lfu", False), "prefetch": ("lru", True)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        metavar="RUN_DIR",
        default=None,
        help="benchmark this trained run (default: the random-init topk-tiny preset)",
    )
    parser.add_argument(
        "--checkpoint", default=None, help="with --run: step number or step_* name (latest)"
    )
    random_only = "random init only; default "
    parser.add_argument("--experts", type=int, default=None, help=random_only + "64 per layer")
    parser.add_argument("--budgets", default="10,25,50,100", help="%% of the experts' bytes")
    parser.add_argument("--policies", default="lru,lfu,prefetch", help=", ".join(POLICIES))
    parser.add_argument("--tier", default="disk", help="disk (real), pcie16, nvme3 (modelled)")
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per run (64)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--top-k", type=int, default=None, help=random_only + "the preset's 1 expert per token"
    )
    parser.add_argument(
        "--d-hidden", type=int, default=None, help=random_only + "344; int4 needs 32 | it"
    )
    parser.add_argument(
        "--miss-precision",
        default=None,
        metavar="int8|int4",
        help="also run each budget and policy with low-precision expert copies (HOBBIT)",
    )
    parser.add_argument(
        "--miss-threshold",
        type=float,
        default=None,
        metavar="SHARE",
        help="with --miss-precision: gate share of the top gate below which a miss runs from its "
        "copy (default 0.5)",
    )
    parser.add_argument(
        "--feed",
        choices=("text", "greedy"),
        default=None,
        help="tokens fed while decoding: the validation text after the prompt (needs --run; its "
        "default) or the model's own greedy tokens (random init's default)",
    )
    add_read_workers_argument(parser)
    parser.add_argument(
        "--nll-windows",
        type=int,
        default=8,
        help="with --run and --miss-precision: validation windows scored for the NLL column (8)",
    )


def _decode(
    model: Any,
    prompt: Any,
    tokens: int,
    session: Any = None,
    force: list[int] | None = None,
    logits: list | None = None,
) -> tuple[float, list[int], list[int]]:
    """Seconds to decode ``tokens`` tokens after a prefill (not timed), the tokens fed, and the
    greedy prediction after the prompt and after each step. ``force``: feed these tokens instead
    of the model's own (greedy); ``logits``: append each step's. Each step runs as ``moelab
    generate`` runs it (:class:`~moelab.model.generate.PlainDecoder`, the short decode step),
    for the loaded and the offloaded model alike."""
    import torch

    from moelab.model.generate import PlainDecoder

    with torch.no_grad():
        decoder = PlainDecoder(model)
        nxt = decoder.prefill(prompt, None, prompt.shape[1] + tokens).argmax(-1)
        if session is not None:
            session.reset_counters()
        out, preds = [], [int(nxt)]
        t0 = time.perf_counter()
        for i in range(tokens):
            if force is not None:
                nxt = torch.tensor([force[i]])
            out.append(int(nxt))
            step = decoder.step(nxt)
            if logits is not None:
                logits.append(step)
            nxt = step.argmax(-1)
            preds.append(int(nxt))
        return time.perf_counter() - t0, out, preds


def _variants(
    budgets: list[float], policies: list[str], miss: str | None
) -> Iterator[tuple[float, str, str | None]]:
    """(budget, policy, low precision or None) in the order every round runs them: each budget
    and policy plain, then (with ``--miss-precision``) with the copies."""
    for b in budgets:
        for p in policies:
            yield from ((b, p, low) for low in ((None, miss) if miss else (None,)))


def _check(args: argparse.Namespace, cfg: Any) -> None:
    """The low-precision options, one line each, before any model is built."""
    from moelab.serve.lowprec import check_miss_options, miss_group

    if args.miss_threshold is not None and args.miss_precision is None:
        raise ValueError("--miss-threshold: needs --miss-precision (int8 or int4)")
    if args.miss_precision is None:
        return
    threshold = 0.5 if args.miss_threshold is None else args.miss_threshold
    check_miss_options(args.miss_precision, threshold)
    for i in cfg.model.ffn_layer_indices():
        miss_group(args.miss_precision, cfg.model.d_model, cfg.model.ffn_for(i).d_hidden)


def run(args: argparse.Namespace) -> int:
    import torch

    from moelab.bench.offload_models import bench_config, open_bench_model
    from moelab.bench.offload_table import compare, print_table, rows_of

    budgets = [float(b) for b in args.budgets.split(",")]
    policies = args.policies.split(",")
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"--policies: each must be one of {', '.join(POLICIES)}, got {p!r}")
    cfg = bench_config(args)
    _check(args, cfg)
    miss = args.miss_precision
    miss_kw = {} if args.miss_threshold is None else {"miss_threshold": args.miss_threshold}
    read_kw = {} if args.read_workers is None else {"read_workers": args.read_workers}
    if read_kw:
        check_read_workers(args.read_workers, "--read-workers")
    torch.set_num_threads(args.threads)
    times: dict[Any, list[float]] = {"loaded": []}
    stats: dict[Any, list[dict]] = {}
    diffs: dict[Any, list[tuple[float, float]]] = {}  # (max abs logit diff, top-1 agreement)
    refused: dict[float, str] = {}
    with open_bench_model(args, cfg) as bench:
        model, prompt = bench.model, bench.prompt
        text = bench.text  # tokens fed: the validation text (--feed text) or greedy (None)
        _decode(model, prompt, args.tokens, force=text)  # warm-up (allocator, kernels), not timed
        for r in range(args.repeats):
            ref: list | None = [] if miss else None
            seconds, want, want_preds = _decode(model, prompt, args.tokens, force=text, logits=ref)
            times["loaded"].append(seconds)
            for b, p, low in _variants(budgets, policies, miss):
                if low is not None and b in refused:
                    continue
                policy, prefetch = POLICIES[p]
                low_kw = read_kw | ({} if low is None else {"miss_precision": low} | miss_kw)
                try:
                    served, session = bench.serve(b, policy, prefetch, low_kw)
                except ValueError as err:
                    if low is None:
                        raise
                    refused[b] = str(err)
                    continue
                key = (b, p) if low is None else (b, p, low)
                got_logits: list | None = [] if miss else None
                force = want if low else text
                seconds, _, got = _decode(
                    served, prompt, args.tokens, session, force=force, logits=got_logits
                )
                if low is None and got != want_preds:
                    raise RuntimeError(
                        f"offloaded tokens differ from the loaded model's ({b}%, {p})"
                    )
                times.setdefault(key, []).append(seconds)
                stats.setdefault(key, []).append(session.stats())
                if ref is not None and got_logits is not None:
                    diffs.setdefault(key, []).append(compare(ref, got_logits))
                session.close()
            print(f"round {r + 1}/{args.repeats} done", flush=True)
        nll = _nll(bench, list(times), miss_kw, args.prompt_len) if bench.windows else {}
    rows = rows_of(times, stats, args.tokens, diffs, nll)
    rows[0] |= {"prompt": prompt[0].tolist(), "fed": want, "predicted": want_preds}
    rows += [
        {"budget": b, "policy": p, "miss_precision": miss, "refused": refused[b]}
        for b in budgets
        if b in refused
        for p in policies
    ]
    print_table(rows, args, stats, bench.label)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _nll(bench: Any, keys: list, miss_kw: dict, prompt_len: int) -> dict[Any, dict[str, float]]:
    """Continuation scores of ``bench.windows`` for every variant, each on a fresh model (the
    loaded one as is), so the cache starts cold as in the timed runs."""
    from moelab.eval.continuation import continuation_scores
    from moelab.eval.decoding import make_decoder

    out = {}
    for key in keys:
        session = None
        if key == "loaded":
            model = bench.model
        else:
            policy, prefetch = POLICIES[key[1]]
            low_kw = {} if len(key) == 2 else {"miss_precision": key[2]} | miss_kw
            model, session = bench.serve(key[0], policy, prefetch, low_kw)
        out[key] = continuation_scores(
            lambda model=model: make_decoder(model, "plain"), bench.windows, prompt_len
        )
        if session is not None:  # how often the copies served a miss while scoring
            out[key]["lowprec_hits"] = float(session.stats().get("lowprec_hits") or 0)
            session.close()
    return out
