"""Data through `datasets`: local files read by its builders, instruction data tokenised by a batched, cached map,
and `task.streaming` (an IterableDataset read as training goes)."""

import csv
import json

import pandas as pd
import pytest
from omegaconf import OmegaConf

from lorafa import tasks
from lorafa.checks import BadInput
from lorafa.models import load_tokenizer

from .conftest import ROOT, compose_cfg


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """datasets' cache (the Arrow copies of the files, the tokenised tables) in the test's temporary directory."""
    import datasets.config

    path = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", path)
    return path


# what the pandas readers gave before local files went through datasets: the reference
PANDAS_READERS = {
    ".csv": lambda p: pd.read_csv(p, keep_default_na=False),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False),
    ".json": lambda p: pd.read_json(p),
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".parquet": pd.read_parquet,
}
TRICKY = pd.DataFrame({"text": ["good", "NA", "", 'say "hi', "naïve café", "null"],
                       "text_pair": ["a", "b", "c", "d", "e", "f"], "label": [1, 0, 2, 1, 0, 2]})


def _write(frame: pd.DataFrame, path):
    {".csv": lambda p: frame.to_csv(p, index=False),
     ".tsv": lambda p: frame.to_csv(p, sep="\t", index=False, quoting=csv.QUOTE_NONE, escapechar=None),
     ".jsonl": lambda p: frame.to_json(p, orient="records", lines=True, force_ascii=False),
     ".json": lambda p: frame.to_json(p, orient="records", force_ascii=False),
     ".parquet": lambda p: frame.to_parquet(p)}[path.suffix](path)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_local_files_load_through_datasets_as_the_pandas_readers_read_them(tmp_path, suffix, monkeypatch):
    """Every format, read by datasets' builder (`datasets.load_dataset(<builder>, data_files=...)`), gives the rows
    the pandas readers gave: "NA", "null" and "" stay text, quotes in a TSV are literal."""
    import datasets

    path = tmp_path / f"train{suffix}"
    _write(TRICKY, path)
    builders = []
    real = datasets.load_dataset

    def spy(builder, *args, **kwargs):
        builders.append(builder)
        return real(builder, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    frame = tasks.read_table(str(path))
    assert builders == [{".tsv": "csv", ".jsonl": "json"}.get(suffix, suffix[1:])]
    expected = PANDAS_READERS[suffix](path)
    assert list(frame.columns) == list(expected.columns)
    assert frame.astype(str).values.tolist() == expected.astype(str).values.tolist()
    assert frame["label"].tolist() == [1, 0, 2, 1, 0, 2]


def test_local_files_cache_outside_the_repository(tmp_path, cache):
    """The Arrow copy of a file and its tokenised table live in datasets' cache (here the test's), none in the
    repository; a second encode reads the cached table instead of tokenising again."""
    cfg = compose_cfg(["model=tiny-llama", "task=alpaca_mmlu_sample"])
    data = tasks.load_data(cfg.task)
    poser = tasks.poser_for("decoder", data, cfg.task, load_tokenizer(cfg.model))
    first = poser.encode(data.splits["train"])
    files = [f["filename"] for f in first.table.cache_files]
    assert files and all(str(cache) in f and str(ROOT) not in f for f in files)
    again = tasks.poser_for("decoder", tasks.load_data(cfg.task), cfg.task, poser.tok).encode(data.splits["train"])
    assert [f["filename"] for f in again.table.cache_files] == files  # datasets' fingerprint: the cached table


def _per_example(tok, prompt: str, response: str, max_len: int) -> dict | None:
    """The encoding before batched maps, one example at a time (None: a prompt that fills the window)."""
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    ids, labels = (p + r + [tok.eos_token_id])[:max_len], ([-100] * len(p) + r + [tok.eos_token_id])[:max_len]
    return {"input_ids": ids, "labels": labels} if any(t != -100 for t in labels) else None


@pytest.mark.parametrize("max_len", [256, 90, 60])
def test_batched_map_gives_the_per_example_token_ids(max_len):
    """The batched, cached map gives each example's token ids and labels as the per-example encoding did, cut at
    max_seq_len, the examples whose prompt fills the window dropped (at 90 tokens some are, at 60 all); lengths from the
    length column."""
    cfg = compose_cfg(["model=tiny-llama", "task=alpaca_mmlu_sample", f"task.max_seq_len={max_len}"])
    data = tasks.load_data(cfg.task)
    tok = load_tokenizer(cfg.model)
    features = tasks.poser_for("decoder", data, cfg.task, tok).encode(data.splits["train"])
    assert isinstance(features, tasks.Encoded)
    expected = [e for r in data.splits["train"] if (e := _per_example(tok, r["prompt"], r["response"], max_len))]
    assert list(features) == expected and [features[i] for i in range(len(features))] == expected
    assert list(features.lengths) == [len(e["input_ids"]) for e in expected]
    assert {256: len(expected) == 16, 90: 0 < len(expected) < 16, 60: not expected}[max_len]


def _flan_file(tmp_path, n: int):
    path = tmp_path / "flan.jsonl"
    path.write_text("".join(json.dumps({"inputs": f"Question {i}: what is {i} + {i}?", "targets": str(2 * i)}) + "\n"
                            for i in range(n)))
    return path


def test_streaming_yields_the_same_examples_in_a_shuffled_order(tmp_path):
    """task.streaming=true: the same tokenised examples as the Dataset path (order may differ: a shuffle buffer);
    past the data's end the stream starts over, reshuffled, every example once per pass."""
    path = _flan_file(tmp_path, 40)
    cfg = compose_cfg(["model=tiny-llama", "task=flan_mmlu", f"task.data_files.train={path}", "task.max_seq_len=128",
                       "task.shuffle_buffer=16"])
    tok = load_tokenizer(cfg.model)
    data = tasks.load_data(cfg.task)
    listed = list(tasks.poser_for("decoder", data, cfg.task, tok).encode(data.splits["train"]))
    streamed_cfg = OmegaConf.merge(cfg.task, {"streaming": True})
    streamed = tasks.load_data(streamed_cfg)
    assert streamed.streaming and not isinstance(streamed.splits["train"], type(data.splits["train"]))
    stream = tasks.poser_for("decoder", streamed, streamed_cfg, tok).stream(streamed.splits["train"], 80, seed=0)
    read = [stream[i] for i in range(80)]
    key = [tuple(f["input_ids"]) for f in listed]
    first, second = [tuple(f["input_ids"]) for f in read[:40]], [tuple(f["input_ids"]) for f in read[40:]]
    assert sorted(first) == sorted(key) and sorted(second) == sorted(key)  # each pass: every example once
    assert first != key and second != first  # shuffled, and reshuffled for the second pass
    assert all(f["labels"] == listed[key.index(tuple(f["input_ids"]))]["labels"] for f in read)
    assert stream.passes == 1 and len(stream) == 80
    with pytest.raises(IndexError, match="read already"):
        stream[3]


def test_a_streamed_job_trains_without_materialising_the_data(cfg_factory, monkeypatch):
    """`task.streaming=true train.max_steps=3` on the shipped instruction sample: an ok row, 3 steps of 8 examples
    read from the stream; the Dataset path (`InstructionPoser.encode`) never runs."""
    from lorafa.job import run

    def no_encode(self, frame):
        raise AssertionError("a streamed job encoded its whole training data")

    monkeypatch.setattr(tasks.InstructionPoser, "encode", no_encode)
    row = run(cfg_factory("model=tiny-llama", "method=lorafa", "task=alpaca_mmlu_sample", "task.streaming=true",
                          "train.max_steps=3", "task.mmlu_limit=1", "task.num_fewshot=0"))
    assert row["status"] == "ok", row["error"]
    assert row["train_steps"] == 3 and row["train_examples"] == 24 and len(row["loss_curve"]) == 3


@pytest.mark.bad_input("task.streaming without train.max_steps, or with what needs the whole data")
def test_streaming_refuses_what_needs_the_whole_data(cfg_factory):
    """Streaming without train.max_steps, or with what needs every example (or a saved place in the stream) up
    front — checkpoints and resumption included — is refused in one line, before any data is read."""
    from lorafa.job import run

    def refused(overrides, says):
        with pytest.raises(BadInput) as err:
            run(cfg_factory("model=tiny-llama", "task=alpaca_mmlu_sample", "task.streaming=true", *overrides))
        assert says in str(err.value) and "\n" not in str(err.value), str(err.value)

    refused([], "task.streaming=true needs train.max_steps=N")
    refused(["train.max_steps=2", "train.checkpoint_every=1"], "train.checkpoint_every=1: not with task.streaming")
    refused(["train.max_steps=2", "train.resume=true"], "train.resume=True: not with task.streaming")
    refused(["train.max_steps=2", "task.packing=true"], "task.packing=True: not with task.streaming")
    refused(["train.max_steps=2", "train.group_by_length=true"], "train.group_by_length=True: not with")
