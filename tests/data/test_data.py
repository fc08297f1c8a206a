"""Tests of the data layer: tokenizer, prepare (all formats), datasets, samplers, bad input."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import moelab.data.default as default_module
from moelab.commands import data as data_cmd
from moelab.data import (
    EOS_TOKEN,
    BatchSampler,
    TokenDataset,
    check_vocab_compatible,
    choose_dtype,
    default_dataset_dir,
    iter_eval_batches,
    load_tokenizer,
    prepare,
    unigram_entropy,
)
from moelab.data.prepare import _publish, assign_splits

TOK = load_tokenizer()

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\twith tabs  ",
    "Ünïcödé — “quotes”, emoji 🙂 and 漢字.",
    "",
    "   leading and trailing spaces   \n\n\n",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    return path


def doc_tokens(texts: list[str]) -> int:
    return sum(len(TOK.encode(t)) + 1 for t in texts)


def corpus_records(n_per_domain: int = 10) -> list[dict]:
    return [
        {"text": f"{dom} document number {i}: " + " ".join([dom] * (i + 1)), "domain": dom}
        for dom in ("alpha", "beta")
        for i in range(n_per_domain)
    ]


def split_documents(ds: TokenDataset, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a split at end-of-text tokens into (tokens, domain ids) per document."""
    tokens = np.asarray(ds.split(split))
    domains = np.asarray(ds.domain_ids(split))
    ends = np.flatnonzero(tokens == ds.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [(tokens[s : e + 1], domains[s : e + 1]) for s, e in zip(starts, ends, strict=True)]


# ---------------------------------------------------------------- tokenizer


def test_shipped_tokenizer_basics():
    assert TOK.vocab_size == 8192
    assert TOK.eos_id == TOK._tok.token_to_id(EOS_TOKEN) == 0
    assert TOK.path.name == "tokenizer.json" and TOK.path.is_file()
    # the corpus-trained BPE compresses English and code well below 1 token per 2 characters
    text = "The function returns a list of strings.\n    return [str(x) for x in items]\n"
    assert len(TOK.encode(text)) < len(text) / 2.5


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(text):
    ids = TOK.encode(text)
    assert all(0 <= i < TOK.vocab_size for i in ids)
    assert TOK.decode(ids) == text


def test_encode_batch_matches_encode_and_eos_decodes():
    assert TOK.encode_batch(SAMPLES) == [TOK.encode(t) for t in SAMPLES]
    assert TOK.decode(TOK.encode("a") + [TOK.eos_id]) == "a" + EOS_TOKEN
    assert TOK.decode(TOK.encode("a") + [TOK.eos_id], skip_special_tokens=True) == "a"


def test_load_tokenizer_from_dir_and_file(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(TOK.path.read_bytes())
    for path in (tmp_path, tmp_path / "tokenizer.json", str(tmp_path)):
        tok = load_tokenizer(path)
        assert tok.vocab_size == 8192 and tok.encode("hello world") == TOK.encode("hello world")


def test_hf_dir_eos_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(TOK.path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>"}))
    assert load_tokenizer(tmp_path).eos_id == TOK._tok.token_to_id("<|pad|>") == 1


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(None, eos_token="<no-such-token>")


# ---------------------------------------------------------------- prepare: formats


def test_prepare_text_directory(tmp_path):
    src = tmp_path / "src"
    (src / "poems").mkdir(parents=True)
    texts = {
        "a.txt": "first document\n",
        "poems/b.txt": "Roses are red.\nViolets are blue.\n",
        "c.txt": "third one, with more words than the others",
    }
    for name, text in texts.items():
        (src / name).write_text(text)
    (src / "ignored.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = prepare(src, tmp_path / "out", val_fraction=0.3, domain_from_dir=True)
    ds = TokenDataset(out)
    meta = ds.meta
    assert meta["domains"] == ["default", "poems"]
    assert meta["documents"]["train"] + meta["documents"]["val"] == 3
    assert meta["documents"]["val"] == 1
    assert meta["source"][0]["skipped_by_extension"] == {".png": 1}
    total = doc_tokens(list(texts.values()))
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == total
    assert ds.num_tokens("train") + ds.num_tokens("val") == total
    assert meta["tokens_by_domain"]["train"]["poems"] + meta["tokens_by_domain"]["val"][
        "poems"
    ] == doc_tokens([texts["poems/b.txt"]])
    assert (out / "tokenizer.json").read_bytes() == TOK.path.read_bytes()
    assert meta["tokenizer_sha256"] == TOK.sha256
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # temp dir renamed away


def make_source_tree(root: Path) -> Path:
    """A small repository: code, docs, a binary, a JSONL data file and a .git directory."""
    files = {f"pkg/mod{i}.py": f"def f{i}(x):\n    return x + {i}\n" for i in range(5)}
    files |= {
        "README.md": "# A project\n\nIt does things.\n",
        "docs/guide.rst": "Guide\n=====\n",
        "notes.TXT": "upper-case extension",
        "src/main.c": "int main(void) { return 0; }\n",
        "Makefile": "all:\n\ttrue\n",
        "data/rows.jsonl": '{"text": "a record"}\n',
        ".git/config": "[core]\n",
        ".git/objects/ab": "blob",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return root


def test_prepare_directory_takes_text_and_code_and_reports_the_rest(tmp_path, capsys):
    """Issue #11: a directory of .py files (a whole domain) was silently dropped; now common
    text/code extensions are read by default and what was taken or skipped is counted."""
    src = make_source_tree(tmp_path / "repo")
    out = tmp_path / "out"
    assert run_cli(["data", "prepare", str(src), "-o", str(out), "--val-fraction", "0.2"]) == 0
    meta = TokenDataset(out).meta
    assert sum(meta["documents"].values()) == 9  # 5 .py, .md, .rst, .TXT, .c
    source = meta["source"][0]
    assert source["files_by_extension"] == {".c": 1, ".md": 1, ".py": 5, ".rst": 1, ".txt": 1}
    assert source["skipped_by_extension"] == {"(none)": 1, ".jsonl": 1, ".png": 1}
    assert source["skipped_hidden"] == 2
    printed = capsys.readouterr().out
    assert (
        f"input      {src}: took 9 files (.py 5, .c 1, .md 1, .rst 1, .txt 1); skipped 3 "
        "((none) 1, .jsonl 1, .png 1); ignored 2 under hidden directories"
    ) in printed
    # --extensions chooses (with or without dots, any case)
    assert (
        run_cli(["data", "prepare", str(src), "-o", str(tmp_path / "py"), "--extensions", "py,.MD"])
        == 0
    )
    source = TokenDataset(tmp_path / "py").meta["source"][0]
    assert source["files_by_extension"] == {".md": 1, ".py": 5}
    assert source["skipped_by_extension"][".c"] == 1
    assert "took 6 files (.py 5, .md 1)" in capsys.readouterr().out


def test_prepare_fails_when_a_directory_gives_nothing(tmp_path):
    src = make_source_tree(tmp_path / "repo")
    with pytest.raises(
        ValueError,
        match=r"no file with a text extension taken \(skipped "
        r"\.py 5, .*\); name the extensions to read with --extensions, e\.g\. "
        r"--extensions \.py",
    ):
        prepare(src, tmp_path / "out", extensions=[".go"])
    with pytest.raises(ValueError, match="extensions: give at least one file extension"):
        prepare(src, tmp_path / "out", extensions=" , ")
    assert not (tmp_path / "out").exists()


def test_prepare_single_text_files(tmp_path):
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("alpha text " * 20)
    b.write_text("beta text " * 30)
    ds = TokenDataset(prepare([a, b], tmp_path / "out", domain="books"))
    assert ds.meta["domains"] == ["books"]
    assert sum(ds.meta["tokens"].values()) == doc_tokens([a.read_text(), b.read_text()])


def test_prepare_jsonl_counts_splits_and_domains(tmp_path):
    records = corpus_records(10)
    src = write_jsonl(tmp_path / "docs.jsonl", records)
    ds = TokenDataset(prepare(src, tmp_path / "out", val_fraction=0.2, seed=3))
    meta = ds.meta
    assert meta["domains"] == ["alpha", "beta"]
    assert meta["documents_by_domain"] == {
        "train": {"alpha": 8, "beta": 8},
        "val": {"alpha": 2, "beta": 2},
    }
    for dom in ("alpha", "beta"):
        texts = [r["text"] for r in records if r["domain"] == dom]
        assert meta["tokens_by_domain"]["train"][dom] + meta["tokens_by_domain"]["val"][
            dom
        ] == doc_tokens(texts)
    assert ds.split("train").dtype == np.uint16 and ds.domain_ids("val").dtype == np.uint8
    # every document decodes to an input text of the domain its domain ids claim
    by_text = {r["text"]: r["domain"] for r in records}
    seen = []
    for split in ("train", "val"):
        docs = split_documents(ds, split)
        assert len(docs) == meta["documents"][split]
        for tokens, domains in docs:
            text = TOK.decode(tokens[:-1].tolist())
            assert np.all(domains == meta["domains"].index(by_text[text]))
            seen.append(text)
    assert sorted(seen) == sorted(by_text)
    # the unigram entropy stored in meta is that of the split's tokens
    assert meta["unigram_entropy_nats"]["val"] == pytest.approx(
        unigram_entropy(ds.split("val"), ds.vocab_size), abs=1e-5
    )


def test_prepare_split_is_seeded(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", corpus_records(10))
    a = TokenDataset(prepare(src, tmp_path / "a", seed=1, val_fraction=0.3))
    b = TokenDataset(prepare(src, tmp_path / "b", seed=1, val_fraction=0.3))
    c = TokenDataset(prepare(src, tmp_path / "c", seed=2, val_fraction=0.3))
    assert np.array_equal(a.split("val"), b.split("val"))
    assert not np.array_equal(a.split("val"), c.split("val"))


def test_prepare_jsonl_gz_custom_fields(tmp_path):
    src = tmp_path / "docs.jsonl.gz"
    lines = [json.dumps({"body": f"text {i}", "kind": "k1" if i % 2 else None}) for i in range(6)]
    with gzip.open(src, "wt") as f:
        f.write("\n".join(lines) + "\n\n")  # blank lines are skipped
    ds = TokenDataset(
        prepare(
            src,
            tmp_path / "out",
            text_field="body",
            domain_field="kind",
            domain="other",
            val_fraction=0.5,
        )
    )
    assert ds.meta["domains"] == ["k1", "other"]
    assert ds.meta["documents"] == {"train": 2, "val": 4}  # 3 per domain, half up: 2 held out
    assert ds.meta["source"][0]["text_field"] == "body"


def test_assign_splits_counts():
    domains = ["a"] * 100 + ["b"] * 7 + ["c"]
    is_val = assign_splits(domains, 0.1, seed=0)
    labels = np.array(domains)
    assert [int(is_val[labels == d].sum()) for d in "abc"] == [10, 1, 0]
    assert np.array_equal(is_val, assign_splits(domains, 0.1, seed=0))


def test_hf_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = corpus_records(5)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    ds = TokenDataset(prepare(tmp_path / "hf", tmp_path / "out", val_fraction=0.2))
    assert ds.meta["domains"] == ["alpha", "beta"]
    assert sum(ds.meta["tokens"].values()) == doc_tokens([r["text"] for r in records])


def test_hf_dataset_without_datasets_installed(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_info.json").write_text("{}")
    with pytest.raises(ValueError, match="optional 'datasets' package"):
        prepare(tmp_path / "hf", tmp_path / "out")


# ---------------------------------------------------------------- dtype


def big_vocab_tokenizer(path: Path, n: int = 70_000) -> Path:
    vocab = {EOS_TOKEN: 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(n)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_choose_dtype():
    assert choose_dtype(8192) == "uint16"
    assert choose_dtype(65536) == "uint16"
    assert choose_dtype(65537) == "uint32"
    assert choose_dtype(100, "uint32") == "uint32"
    with pytest.raises(ValueError, match="does not fit uint16"):
        choose_dtype(65537, "uint16")
    with pytest.raises(ValueError, match="allowed: auto, uint16, uint32"):
        choose_dtype(100, "int8")


def test_large_vocab_uses_uint32(tmp_path):
    tok_path = big_vocab_tokenizer(tmp_path / "big.json")
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "w69999 w1 w65536"}, {"text": "w5"}])
    ds = TokenDataset(prepare(src, tmp_path / "out", tokenizer=tok_path, val_fraction=0.5))
    assert ds.meta["dtype"] == "uint32" and ds.vocab_size == 70_002
    all_ids = set(ds.split("train").tolist()) | set(ds.split("val").tolist())
    assert {70_001, 65_538, 3, 7, 0} == all_ids
    with pytest.raises(ValueError, match="does not fit uint16"):
        prepare(src, tmp_path / "out16", tokenizer=tok_path, dtype="uint16")
    assert not (tmp_path / "out16").exists()


# ---------------------------------------------------------------- samplers


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> TokenDataset:
    tmp = tmp_path_factory.mktemp("small")
    records = [
        {"text": " ".join(f"word{i}x{j}" for j in range(40)), "domain": f"d{i % 3}"}
        for i in range(30)
    ]
    return TokenDataset(
        prepare(write_jsonl(tmp / "d.jsonl", records), tmp / "out", val_fraction=0.2)
    )


def test_batch_sampler_windows_and_determinism(small_ds):
    s1 = BatchSampler(small_ds, "train", seq_len=16, batch_size=4, seed=7)
    s2 = BatchSampler(small_ds, "train", seq_len=16, batch_size=4, seed=7)
    s3 = BatchSampler(small_ds, "train", seq_len=16, batch_size=4, seed=8)
    tokens = np.asarray(small_ds.split("train"))
    for _ in range(3):
        x, y = s1.next_batch()
        x2, y2 = s2.next_batch()
        x3, _ = s3.next_batch()
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
        assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, start in zip(x, s1.starts(s1.position - 1), strict=True):
            assert np.array_equal(row.numpy(), tokens[start : start + 16])
    other_rank = BatchSampler(small_ds, "train", 16, 4, seed=7, rank=1)
    assert not torch.equal(
        other_rank.next_batch()[0], BatchSampler(small_ds, "train", 16, 4, seed=7).next_batch()[0]
    )


def test_batch_sampler_resume_is_exact(small_ds):
    run = BatchSampler(small_ds, "train", seq_len=8, batch_size=3, seed=1)
    for _ in range(5):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    assert state == {"seed": 1, "position": 5}
    expected = [run.next_batch() for _ in range(3)]
    resumed = BatchSampler(small_ds, "train", seq_len=8, batch_size=3, seed=999)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip((resumed.next_batch() for _ in range(3)), expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_sampler_covers_last_token_position(small_ds):
    n = small_ds.num_tokens("val")
    sampler = BatchSampler(small_ds, "val", seq_len=n - 1, batch_size=2, seed=0)
    x, y = sampler.next_batch()
    assert torch.equal(y[0], torch.from_numpy(small_ds.split("val")[1:].astype(np.int64)))


def test_eval_batches_tile_the_split(small_ds):
    L, B = 10, 3
    tokens = np.asarray(small_ds.split("val"))
    domains = np.asarray(small_ds.domain_ids("val"))
    batches = list(iter_eval_batches(small_ds, "val", L, B))
    n_windows = (len(tokens) - 1) // L
    assert len(batches) == -(-n_windows // B)
    targets = torch.cat([b["targets"] for b in batches]).reshape(-1).numpy()
    inputs = torch.cat([b["input_ids"] for b in batches]).reshape(-1).numpy()
    dom = torch.cat([b["domain_ids"] for b in batches]).reshape(-1).numpy()
    assert np.array_equal(targets, tokens[1 : 1 + n_windows * L])
    assert np.array_equal(inputs, tokens[: n_windows * L])
    assert np.array_equal(dom, domains[1 : 1 + n_windows * L])
    assert all(b["input_ids"].shape[1] == L for b in batches)
    assert len(list(iter_eval_batches(small_ds, "val", L, B, max_batches=2))) == 2


# ---------------------------------------------------------------- default corpus


def test_default_dataset_dir_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    path = default_dataset_dir()
    assert path.parent == tmp_path / "cache" / "datasets" and path.name.startswith("embedded-")
    ds = TokenDataset(path)
    meta = ds.meta
    assert meta["domains"] == ["code", "docs", "prose"]
    assert meta["vocab_size"] == 8192 and meta["dtype"] == "uint16"
    for dom in meta["domains"]:
        assert meta["tokens_by_domain"]["train"][dom] > 500_000
        assert meta["tokens_by_domain"]["val"][dom] > 20_000
    assert 5.0 < meta["unigram_entropy_nats"]["val"] < 8.0
    stamp = (path / "meta.json").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the default dataset was prepared a second time")

    monkeypatch.setattr(default_module, "prepare", no_rebuild)
    assert default_dataset_dir() == path
    assert (path / "meta.json").stat().st_mtime_ns == stamp


def test_publish_refuses_to_clobber(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "meta.json").write_text("{}")
    (tmp_path / "tmp").mkdir()
    with pytest.raises(FileExistsError):
        _publish(tmp_path / "tmp", tmp_path / "out", overwrite=False)
    assert not (tmp_path / "tmp").exists()
    assert (tmp_path / "out" / "meta.json").read_text() == "{}"


# ---------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", corpus_records(3))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no such file"):
        prepare(tmp_path / "missing.jsonl", out)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty input"):
        prepare(tmp_path / "empty_dir", out)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty input"):
        prepare(tmp_path / "blank.jsonl", out)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty input"):
        prepare(tmp_path / "empty.txt", out)
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="unknown format"):
        prepare(tmp_path / "data.parquet", out)
    with pytest.raises(ValueError, match="allowed: auto, text, jsonl, hf"):
        prepare(good, out, format="parquet")
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            prepare(good, out, val_fraction=bad)
    with pytest.raises(ValueError, match="seed: must be a non-negative"):
        prepare(good, out, seed=-1)
    write_jsonl(tmp_path / "notext.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(ValueError, match=r"line 2: missing text field 'text'.*\['body'\]"):
        prepare(tmp_path / "notext.jsonl", out)
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        prepare(tmp_path / "broken.jsonl", out)
    write_jsonl(tmp_path / "nonstr.jsonl", [{"text": 3}])
    with pytest.raises(ValueError, match="must be a string"):
        prepare(tmp_path / "nonstr.jsonl", out)
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(ValueError, match="at least 2 documents"):
        prepare(tmp_path / "one.txt", out)
    assert not out.exists()  # nothing was written by any failure
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    prepare(good, out)
    with pytest.raises(ValueError, match="--overwrite"):
        prepare(good, out)
    prepare(good, out, overwrite=True, val_fraction=0.5)
    assert TokenDataset(out).meta["val_fraction"] == 0.5


def test_overwrite_replaces_only_a_dataset(tmp_path):
    """--overwrite must never delete what prepare did not write: a run, a user's folder, extra
    files beside a dataset, or the inputs themselves."""
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"text": f"document number {i} " * 5} for i in range(6)])
    user = tmp_path / "mine"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not one .*notes/.*nothing was removed"):
        prepare(good, user, overwrite=True)
    assert (user / "notes" / "todo.txt").read_text() == "keep me"
    out = tmp_path / "out"
    prepare(good, out)
    (out / "extra.txt").write_text("mine")
    with pytest.raises(ValueError, match="also extra.txt"):
        prepare(good, out, overwrite=True)
    assert (out / "extra.txt").exists() and (out / "meta.json").exists()
    (out / "extra.txt").unlink()
    prepare(good, out, overwrite=True, val_fraction=0.5)  # a plain dataset is replaced
    assert TokenDataset(out).meta["val_fraction"] == 0.5
    inside = tmp_path / "corpus"
    inside.mkdir()
    write_jsonl(inside / "docs.jsonl", [{"text": f"doc {i} " * 5} for i in range(6)])
    with pytest.raises(ValueError, match="holds the input"):
        prepare(inside / "docs.jsonl", inside, overwrite=True)
    assert (inside / "docs.jsonl").exists()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    from moelab.data.tokenizer import TextTokenizer

    def boom(self, texts):
        raise RuntimeError("tokenizer crashed")

    monkeypatch.setattr(TextTokenizer, "encode_batch", boom)
    with pytest.raises(RuntimeError):
        prepare(write_jsonl(tmp_path / "d.jsonl", corpus_records(3)), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_dataset_and_sampler_errors(tmp_path, small_ds):
    with pytest.raises(ValueError, match="no meta.json"):
        TokenDataset(tmp_path)
    with pytest.raises(ValueError, match="allowed: train, val"):
        small_ds.split("test")
    with pytest.raises(ValueError, match="seq_len"):
        BatchSampler(small_ds, "val", seq_len=small_ds.num_tokens("val"), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(small_ds, "train", seq_len=8, batch_size=0)
    with pytest.raises(ValueError, match="seed/rank"):
        BatchSampler(small_ds, "train", seq_len=8, batch_size=2, seed=-3)
    check_vocab_compatible(small_ds.meta, 8192)
    check_vocab_compatible(small_ds, 8256)
    with pytest.raises(ValueError, match=r"model.vocab_size: 8000 .* 8192"):
        check_vocab_compatible(small_ds.meta, 8000)


# ---------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moelab")
    data_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prepare_and_info(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [{"txt": t} for t in ("one doc", "two docs", "three")])
    out = tmp_path / "out"
    assert (
        run_cli(
            [
                "data",
                "prepare",
                str(src),
                "-o",
                str(out),
                "--text-field",
                "txt",
                "--val-fraction",
                "0.34",
                "--domain",
                "misc",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "misc=" in printed and str(out) in printed
    meta = TokenDataset(out).meta
    assert meta["documents"] == {"train": 2, "val": 1}
    assert run_cli(["data", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["domains"] == ["misc"]
    with pytest.raises(ValueError, match="missing text field 'text'"):
        run_cli(["data", "prepare", str(src), "-o", str(tmp_path / "o2")])


def test_hf_source_logic_with_stub_datasets(tmp_path, monkeypatch):
    """Exercises the HF reader without the optional dependency (the real one runs when present)."""
    import sys
    import types

    class StubDataset:
        def __init__(self, rows: dict[str, list]):
            self.rows = rows
            self.column_names = list(rows)

        def select_columns(self, cols):
            return StubDataset({c: self.rows[c] for c in cols})

        def iter(self, batch_size):
            n = len(next(iter(self.rows.values())))
            for i in range(0, n, batch_size):
                yield {c: v[i : i + batch_size] for c, v in self.rows.items()}

    class StubDatasetDict(dict):
        pass

    texts = [f"hf text {i}" for i in range(4)]
    saved = StubDatasetDict(
        train=StubDataset({"content": texts, "domain": ["x", "y", None, "x"]}),
        test=StubDataset({"content": ["unused"]}),
    )
    stub = types.ModuleType("datasets")
    stub.Dataset, stub.DatasetDict = StubDataset, StubDatasetDict
    stub.load_from_disk = lambda path: saved
    monkeypatch.setitem(sys.modules, "datasets", stub)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text("{}")
    ds = TokenDataset(
        prepare(tmp_path / "hf", tmp_path / "out", text_field="content", val_fraction=0.5)
    )
    assert ds.meta["domains"] == ["default", "x", "y"]
    assert ds.meta["source"][0] | {"path": None} == {
        "path": None,
        "format": "hf",
        "split": "train",
        "text_field": "content",
        "domain_field": "domain",
    }
    assert sum(ds.meta["tokens"].values()) == doc_tokens(texts)
    with pytest.raises(ValueError, match=r"split 'validation' not found .*\['train', 'test'\]"):
        prepare(tmp_path / "hf", tmp_path / "o2", text_field="content", hf_split="validation")
    with pytest.raises(ValueError, match="missing text field 'text'.*columns"):
        prepare(tmp_path / "hf", tmp_path / "o3")


def test_a_non_utf8_file_gets_a_hint_that_keeps_its_extension(tmp_path):
    """Issue #18: the hint said to leave the file's extension out with --extensions, which for a
    .txt file drops every .txt of the corpus; it now says to convert or move that one file."""
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("plain text, fine")
    (src / "b.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        prepare(src, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"input {src / 'b.txt'}: not UTF-8 text (byte 0xe9 at offset 3)")
    assert "convert it to UTF-8" in message and "--extensions" not in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_an_unwritable_cache_is_one_line_naming_moelab_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MOELAB_CACHE", str(blocker))
    with pytest.raises(ValueError, match=r"^MOELAB_CACHE: cannot write the default dataset under "):
        default_dataset_dir()
