"""Evaluation with EleutherAI's ``lm-eval`` harness (``moelab lm-eval``), and a local cloze task.

:class:`MoelabLM` is a moelab model behind lm-eval's model interface (``TemplateLM``: lm-eval does
the request handling, prompt formatting and every metric; this class only scores and generates
tokens), so any lm-eval task runs on a moelab run. An exported directory (``moelab export-hf``)
needs no adapter: lm-eval's own ``hf`` model loads it (``pretrained=DIR,trust_remote_code=True``).

Hub tasks need network access, so :func:`build_cloze_task` writes a small local task in lm-eval's
YAML format: ``moelab_cloze``, multiple-choice next-word prediction on a dataset's held-out (val)
split. Each item is ~200 characters of held-out text ending before a word of at least four letters;
the choices are that word and three words found at other random positions of the split. Targets and
distractors are drawn from the same distribution (word frequencies included), so a model that
ignores the context, unigram statistics and all, scores 25% on average: what is above that is the
use of context. Metrics ``acc`` (the choice with the highest log-likelihood) and ``acc_norm`` (per
byte).
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from moelab.data import TokenDataset, default_dataset_dir
from moelab.data.tokenizer import TextTokenizer
from moelab.eval.continuation import score_continuation, score_requests
from moelab.eval.decoding import DECODINGS, make_decoder
from moelab.hf.harness_network import download_hint, is_network_error
from moelab.model import TransformerLM, generate
from moelab.train import load_run, load_run_config, open_dataset, run_tokenizer

CLOZE_TASK = "moelab_cloze"
_WORD = re.compile(r"(?<=\S )([A-Za-z]{4,})\b")  # a word after one space


def _offline() -> None:
    """Only local tasks asked for: never let datasets / the hub client go online (a hub task
    keeps the network, and without one gets :func:`~moelab.hf.harness_network.download_hint`)."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")


def held_out_documents(dataset_dir: str | Path) -> list[str]:
    """The val split of a prepared dataset, decoded, one string per document."""
    dataset = TokenDataset(dataset_dir)
    tok = dataset.tokenizer()
    ids = dataset.split("val").tolist()
    docs, current = [], []
    for i in ids:
        if i == dataset.eos_id:
            if current:
                docs.append(current)
            current = []
        else:
            current.append(i)
    if current:
        docs.append(current)
    return [tok.decode(d) for d in docs]


def build_cloze_task(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    items: int = 300,
    context_chars: int = 200,
    seed: int = 0,
) -> Path:
    """Write ``cloze.jsonl`` and ``moelab_cloze.yaml`` (lm-eval's local task format, the data file
    by absolute path) into ``out_dir``; returns ``out_dir``. Deterministic in ``seed``."""
    if items < 1:
        raise ValueError(f"--items: must be >= 1, got {items}")
    docs = held_out_documents(dataset_dir)
    candidates = [
        (d, m.start())
        for d, text in enumerate(docs)
        for m in _WORD.finditer(text)
        if m.start() >= context_chars // 2
    ]
    occurrences = [_WORD.match(docs[d], s).group(1) for d, s in candidates]
    words = set(occurrences)
    if len(candidates) < items or len(words) < 4:
        raise ValueError(
            f"--data: the val split of {dataset_dir} holds {len(candidates)} cloze positions "
            f"({len(words)} distinct words), fewer than the {items} items asked for; "
            "ask for fewer (--items) or use a larger dataset"
        )
    rng = random.Random(seed)
    rows = []
    for d, start in sorted(rng.sample(candidates, items)):
        text = docs[d]
        word = _WORD.match(text, start).group(1)
        cut = max(0, start - context_chars)
        if cut > 0:  # start the context at a word boundary
            cut = text.find(" ", cut) + 1
        context = text[cut : start - 1]
        choices = [word]
        while len(choices) < 4:  # words at other positions: the targets' own frequencies
            other = occurrences[rng.randrange(len(occurrences))]
            if other not in choices:
                choices.append(other)
        rng.shuffle(choices)
        rows.append({"context": context, "choices": choices, "label": choices.index(word)})
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    data = (out / "cloze.jsonl").resolve()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{CLOZE_TASK}.yaml").write_text(
        f"""# moelab's local cloze task: next-word multiple choice on held-out text
task: {CLOZE_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    )
    return out


def _template_lm() -> type:
    from lm_eval.api.model import TemplateLM  # the optional lm-eval package

    return TemplateLM


def make_lm(
    model: TransformerLM,
    tokenizer: TextTokenizer,
    decoding: str = "plain",
    decoding_options: dict[str, Any] | None = None,
) -> Any:
    """A :class:`MoelabLM` (lm-eval ``LM``) for ``model`` and ``tokenizer`` that scores and
    generates under ``decoding`` (:data:`moelab.eval.decoding.DECODINGS`) with
    ``decoding_options`` (:func:`moelab.eval.decoding.make_decoder`'s keywords), checked here
    in one line before anything else."""
    make_decoder(model, decoding, **(decoding_options or {})).remove()
    return _moelab_lm_class()(model, tokenizer, decoding, decoding_options)


_CLASS: dict[str, type] = {}


def _moelab_lm_class() -> type:
    """lm-eval's ``TemplateLM`` subclassed lazily, so that moelab imports without lm-eval."""
    if "cls" in _CLASS:
        return _CLASS["cls"]
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class MoelabLM(_template_lm()):
        """A moelab :class:`TransformerLM` as an lm-eval model. Every sequence starts after the
        end-of-text token, as documents do in moelab's training data; inputs longer than the
        model's ``max_seq_len`` keep their last tokens. Scores come from ``decoding``'s
        next-token distribution, teacher-forced (:func:`score_continuation`); plain decoding is
        one forward pass per request, a decoder's prefill is shared by the requests of one
        context (:func:`score_requests`)."""

        def __init__(
            self,
            model: TransformerLM,
            tokenizer: TextTokenizer,
            decoding: str = "plain",
            decoding_options: dict[str, Any] | None = None,
        ) -> None:
            super().__init__()
            self.model = model.eval()
            self.tok = tokenizer
            self.max_len = model.cfg.max_seq_len
            self.device_ = next(model.parameters()).device
            options = decoding_options or {}
            self.decoding = decoding
            self.make = None
            if decoding != "plain":
                self.make = lambda: make_decoder(self.model, decoding, **options)

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id if self.tok.eos_id is not None else 0

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list:
            return self.tok.encode(string)

        def tok_decode(self, tokens: list[int], **kw) -> str:
            return self.tok.decode(tokens)

        def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
            """The ids scored (end-of-text, context, continuation; the last ``max_len + 1``)
            and how many of them are the continuation's."""
            ids = [self.eot_token_id, *context, *continuation][-(self.max_len + 1) :]
            return ids, min(len(continuation), len(ids) - 1)  # too long: its last tokens

        def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            """``(log-likelihood, is_greedy)`` of ``continuation`` after ``context``."""
            return score_continuation(self.model, *self._window(context, continuation), self.make)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list:
            """Scores in the requests' order; under a decoder, the requests sharing a context
            (a question's answer choices) share its prefill and adaptation
            (:func:`score_requests`)."""
            windows = []
            for _, context, continuation in requests:
                if context and context[0] == self.eot_token_id:
                    context = context[1:]  # the empty-context case: lm-eval's prefix is ours
                windows.append(self._window(context, continuation))
            out = score_requests(self.model, windows, self.make)
            for (cache_key, _, _), result in zip(requests, out, strict=True):
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (string,) in [r.args for r in requests]:
                windows = map(
                    make_disjoint_window,
                    get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.eot_token_id,
                        max_seq_len=self.max_len,
                        context_len=1,
                    ),
                )
                total = 0.0
                for context, continuation in windows:
                    if context and context[0] == self.eot_token_id:
                        context = context[1:]
                    total += self._score(context, continuation)[0]
                out.append(total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for context, kwargs in [r.args for r in requests]:
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                new = int(kwargs.get("max_gen_toks", 64))
                new = min(new, self.max_len - 1)
                ids = [self.eot_token_id, *self.tok_encode(context)][-(self.max_len - new) :]
                x = torch.tensor([ids], device=self.device_)
                decoder = None if self.make is None else self.make()
                try:
                    tokens = generate(
                        self.model, x, new, temperature=0, eos_id=self.tok.eos_id, decoder=decoder
                    )
                finally:
                    if decoder is not None:
                        decoder.remove()
                text = self.tok_decode(
                    [t for t in tokens[0, len(ids) :].tolist() if t != self.tok.eos_id]
                )
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    _CLASS["cls"] = MoelabLM
    return MoelabLM


def evaluate(
    path: str | Path,
    *,
    tasks: list[str] | None = None,
    include_path: str | Path | None = None,
    data: str | Path | None = None,
    items: int = 300,
    limit: int | None = None,
    task_dir: str | Path | None = None,
    checkpoint: str | int | None = None,
    decoding: str = "plain",
    decoding_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run lm-eval on a moelab run (through :class:`MoelabLM`, scoring under ``decoding`` with
    ``decoding_options``) or an export (through lm-eval's ``hf`` model: plain decoding only).
    ``tasks`` default to the local cloze task, built from the held-out split of ``data``
    (default: the run's own dataset; for an export, the embedded corpus) into ``task_dir``
    (default: a temporary directory, removed afterwards; nothing is written into the run). Returns
    ``{task: {metric: value}}``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    path = Path(path).expanduser()
    exported = (path / "config.json").is_file() and not (path / "config.yaml").is_file()
    if decoding not in DECODINGS:
        raise ValueError(f"--decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    if exported and decoding != "plain":
        raise ValueError(
            f"--decoding {decoding}: {path} is an export, scored by lm-eval's hf model with plain "
            "decoding only; give the run directory for scmoe or reroute"
        )
    lm: Any = None
    if not exported:  # the model and its decoding checked before the task is built
        lm_model, config = load_run(path, checkpoint)
        if config.train.threads is not None:  # the run's choice (tiny presets: 1)
            torch.set_num_threads(config.train.threads)
        lm = make_lm(lm_model, run_tokenizer(path), decoding, decoding_options)
    tasks = tasks or [CLOZE_TASK]
    with tempfile.TemporaryDirectory() as tmp:
        includes = [str(include_path)] if include_path else []
        if CLOZE_TASK in tasks:
            if data is None:
                data = _default_data(path, exported)
            where = task_dir or tmp  # never into the run: it is a source, not ours to write
            includes.append(str(build_cloze_task(data, where, items=items)))
        # indexing lm-eval's thousands of shipped task files takes most of a run's time: skip it
        # when only local tasks are asked for
        local_only = set(tasks) <= {CLOZE_TASK} | _task_names(include_path)
        if local_only:  # a hub task (hellaswag) needs its data from the hub, or from its cache
            _offline()
        manager = TaskManager(include_path=includes or None, include_defaults=not local_only)
        if exported:
            model: Any = "hf"
            model_args: Any = {
                "pretrained": str(path),
                "trust_remote_code": True,
                "dtype": "float32",
                "device": "cuda" if torch.cuda.is_available() else "cpu",
            }
        else:
            model, model_args = lm, None
        try:
            results = lm_eval.simple_evaluate(
                model=model,
                model_args=model_args,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                log_samples=False,
                bootstrap_iters=100,  # acc's stderr is closed-form; a few draws for the rest
            )
        except Exception as err:
            if not is_network_error(err):
                raise
            local = {CLOZE_TASK} | _task_names(include_path)
            raise ValueError(download_hint([t for t in tasks if t not in local], err)) from None
    return {
        task: {k.split(",")[0]: v for k, v in metrics.items() if not k.startswith("alias")}
        for task, metrics in results["results"].items()
    }


def _task_names(include_path: str | Path | None) -> set[str]:
    """Task names defined by the YAML files under ``include_path``."""
    if include_path is None:
        return set()
    names = set()
    for path in Path(include_path).rglob("*.yaml"):
        match = re.search(r"^task:\s*(\S+)", path.read_text("utf-8"), re.M)
        if match:
            names.add(match.group(1).strip("'\""))
    return names


def _default_data(path: Path, exported: bool) -> Path:
    """The dataset whose held-out split the cloze task is built from."""
    if exported:
        return default_dataset_dir()
    return open_dataset(load_run_config(path)).path
