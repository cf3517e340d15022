"""Tasks: their data (hub, local files, shipped, or synthetic), how each model family is asked them, and metrics.

A task config (`conf/task/*.yaml`) names its data, its columns, its labels, how it is phrased for text-to-text
models, and its official metrics. Examples are normalised to columns `text`, `text_pair` (optional) and `label`
(a class index, or a float for regression), then posed to the model's family:

- encoder (RoBERTa): `tokenizer(text, text_pair)` → classification/regression head.
- encoder-decoder (T5): the T5 paper's input ("sst2 sentence: …") → the label word ("positive"), scored at eval
  time by the log-likelihood of each candidate label (label scoring, so every prediction is a valid label).
- decoder (LLaMA): the same input, then "\\nAnswer:" → " positive"; loss on the answer only; label scoring.

`instruction` (Alpaca, FLAN-v2) trains a decoder on prompt → response in the Alpaca template, loss on the response
tokens only; it is scored after training by MMLU k-shot through lm-eval (`lorafa.mmlu`), not per epoch.
`translation` (WMT16 En-Ro) poses text → target text to T5: teacher-forced loss, greedy generation at eval time,
corpus BLEU (sacrebleu). `synthetic` makes random token batches of an exact size for memory and speed at real scale
(metric: loss).
"""

from __future__ import annotations

import bisect
import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from . import loss as lm_loss
from . import sources
from .checks import BadInput

log = logging.getLogger(__name__)

ANSWER_CUE = "\nAnswer:"  # decoders read the prompt, then this, then the label word
# Stanford Alpaca's prompt templates (github.com/tatsu-lab/stanford_alpaca, train.py), with and without an input
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
# the fields of each instruction-data format → (instruction, input, response)
INSTRUCTION_FORMATS = {"alpaca": ("instruction", "input", "output"), "flan": ("inputs", None, "targets")}


# ---------------------------------------------------------------------------------------------------- metrics
def _f1(y, p):
    from sklearn.metrics import f1_score

    return f1_score(y, p, pos_label=1, average="binary", zero_division=0.0)


def _accuracy(y, p):
    from sklearn.metrics import accuracy_score

    return accuracy_score(y, p)


def _matthews(y, p):
    from sklearn.metrics import matthews_corrcoef

    return matthews_corrcoef(y, p)


def _pearson(y, p):
    from scipy.stats import pearsonr

    return pearsonr(y, p)[0] if np.std(p) > 0 else float("nan")  # undefined for a constant prediction


def _spearman(y, p):
    from scipy.stats import spearmanr

    return spearmanr(y, p)[0] if np.std(p) > 0 else float("nan")


def _bleu(y, p):
    """Corpus BLEU of detokenised text (sacrebleu's defaults: 13a tokenisation, case-sensitive), 0–100."""
    import sacrebleu

    return sacrebleu.corpus_bleu([str(t) for t in p], [[str(t) for t in y]]).score


def _chrf(y, p):
    import sacrebleu

    return sacrebleu.corpus_chrf([str(t) for t in p], [[str(t) for t in y]]).score


METRICS = {"accuracy": _accuracy, "f1": _f1, "matthews_corr": _matthews, "pearson": _pearson,
           "spearman": _spearman, "bleu": _bleu, "chrf": _chrf}


def compute_metrics(names, references, predictions) -> dict[str, float]:
    unknown = set(names) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {sorted(METRICS)}")
    return {name: float(METRICS[name](references, predictions)) for name in names}


# ------------------------------------------------------------------------------------------------------- data
@dataclass
class TaskData:
    """Normalised examples of one task: frames with text, [text_pair], label."""

    name: str
    kind: str  # classification | regression | translation | instruction | synthetic
    splits: dict  # "train" and the eval splits, keyed by eval name: pandas frames; instruction data a Dataset
    labels: list[str] | None  # class names in index order (classification)
    dropped_rows: int = 0  # rows with an empty text or label left out (`drop_empty_rows`), over every split
    streaming: bool = False  # `task.streaming`: splits["train"] is a datasets.IterableDataset, read as training goes

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.kind == "classification" else (1 if self.kind == "regression" else 2)


# Local files go through datasets' own builders (`datasets.load_dataset(<builder>, data_files=FILE)`): the file is
# read in chunks into an Arrow table in datasets' cache (HF_DATASETS_CACHE, by default ~/.cache/huggingface/datasets;
# written once per file version, memory-mapped on every later load), so that a file larger than memory loads, and
# with `streaming=True` it is read only as it is iterated. Options keep what the pandas readers did before:
LOADERS = {
    ".csv": ("csv", {"keep_default_na": False}),  # an empty cell is "", not NaN (drop_empty_rows finds it)
    # GLUE's own TSVs contain unbalanced quotes: read tab-separated text literally
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".json": ("json", {}),  # a JSON array of records, or JSON lines (a large file: JSON lines, read in chunks)
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


def _no_rows(err: BaseException) -> bool:
    """Whether datasets failed on a file that holds no rows (a csv with only its header, an empty JSON-lines
    file): it says so in several ways."""
    text = f"{type(err).__name__}: {err} {err.__cause__ or ''}"
    return isinstance(err, StopIteration) or "corresponds to no data" in text or "EmptyDataError" in text


def read_dataset(path: str, key: str = "task.data_files", *, streaming: bool = False):
    """A local data file as `(dataset, its columns)` through `datasets.load_dataset`: a `datasets.Dataset`
    (memory-mapped from datasets' cache), or with `streaming` an `IterableDataset` read as it is iterated. `key`
    names the setting it came from in errors (`BadInput`): a missing, unreadable or empty file, or an unsupported
    type. The first record is read here, in either case, so that a broken or empty file is refused now."""
    import datasets

    suffix = Path(path).suffix.lower()
    if suffix not in LOADERS:
        raise BadInput(f"{key}={path}: unsupported file type {suffix!r}; expected one of {sorted(LOADERS)}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise BadInput(f"{key}={path}: no such file")
    if file.stat().st_size == 0:
        raise BadInput(f"{key}={path}: the file has no rows")
    builder, options = LOADERS[suffix]
    try:
        data = datasets.load_dataset(builder, data_files=str(file), split="train", streaming=streaming, **options)
        first = next(iter(data), None) if streaming else (data[0] if len(data) else None)
    except Exception as err:  # permissions, encoding, a broken file: say which file and why
        if _no_rows(err):
            raise BadInput(f"{key}={path}: the file has no rows") from err
        cause = err.__cause__ or err  # datasets' DatasetGenerationError wraps the reader's error
        raise BadInput(f"{key}={path}: cannot read it as {suffix} ({type(cause).__name__}: "
                       f"{str(cause).splitlines()[0] if str(cause) else ''})") from err
    if first is None:
        raise BadInput(f"{key}={path}: the file has no rows")
    return data, list(data.column_names or first)


def read_table(path: str, key: str = "task.data_files") -> pd.DataFrame:
    """A local data file as a pandas table (read through `read_dataset`). Labelled tasks (GLUE-sized splits of
    short texts) and MMLU's files are small: their label sets, empty-row checks and held-out slices are column
    operations on a frame, and a frame is what the metrics read. Instruction data, where the size grows, stays a
    `datasets.Dataset` (`_load_instructions`)."""
    return read_dataset(path, key)[0].to_pandas()


def _load_hub(tcfg: DictConfig, split: str, streaming: bool = False):
    import datasets

    def load(name):
        extra = {"streaming": True} if streaming else {}
        return datasets.load_dataset(name, tcfg.get("subset"), split=split, **extra)

    return sources.from_hub(f"dataset split {split!r} of", load, tcfg.dataset)


def _load_hub_split(tcfg: DictConfig, split: str) -> pd.DataFrame:
    return _load_hub(tcfg, split).to_pandas()


def _normalise(frame: pd.DataFrame, tcfg: DictConfig, where: str) -> pd.DataFrame:
    """Rename the task's columns to text / text_pair / label (local files may use either naming). A `translation`
    column of {language: sentence} records (the hub's WMT layout) is first spread into one column per language."""
    columns = OmegaConf.to_container(tcfg.columns, resolve=True)
    if "translation" in frame.columns and len(frame) and isinstance(frame["translation"].iloc[0], dict):
        frame = pd.concat([frame.drop(columns="translation"), pd.DataFrame(frame["translation"].tolist())], axis=1)
    out = {}
    for canonical in ("text", "text_pair", "label"):
        source = columns.get(canonical) or canonical
        if source in frame.columns:
            out[canonical] = frame[source]
        elif canonical in frame.columns:
            out[canonical] = frame[canonical]
        elif canonical != "text_pair":  # the only optional column
            raise BadInput(f"{where}: no column {source!r} (or {canonical!r}); columns are {list(frame.columns)}")
    return pd.DataFrame(out)


def load_data(tcfg: DictConfig) -> TaskData:
    """Read the train split and every eval split of a task, from `task.data_files` or the hub."""
    kind = tcfg.kind
    if kind == "synthetic":
        return TaskData(tcfg.name, kind, {}, None)
    if kind == "instruction":
        return _load_instructions(tcfg)
    eval_splits = OmegaConf.to_container(tcfg.eval_splits, resolve=True)
    wanted = {"train": "train", **eval_splits}
    files = {k: str(v) for k, v in (tcfg.get("data_files") or {}).items() if v}  # any local file: all local
    splits, dropped = {}, 0
    for key, split in wanted.items():
        if files:
            if split not in files:
                raise BadInput(f"task.data_files.{split} is not set; this task needs {sorted(set(wanted.values()))}")
            frame, where = read_table(files[split], f"task.data_files.{split}"), files[split]
        elif tcfg.get("dataset"):
            frame, where = _load_hub_split(tcfg, split), f"{tcfg.dataset}:{split}"
        else:
            raise BadInput(f"task {tcfg.name}: set task.data_files.train=FILE task.data_files.validation=FILE")
        frame = _normalise(frame, tcfg, where)
        frame, n_dropped = drop_empty_rows(frame, where)
        dropped += n_dropped
        limit = tcfg.get("max_train_samples" if key == "train" else "max_eval_samples")
        if limit:
            frame = frame.iloc[: int(limit)]
        splits[key] = frame.reset_index(drop=True)

    splits.update(holdout_split(splits.pop("train"), tcfg.get("holdout")))
    labels = list(tcfg.labels) if tcfg.get("labels") else None
    if kind == "classification":
        named = labels is not None
        labels = labels or _label_set(splits["train"]["label"])
        classes = splits["train"]["label"].astype(str).unique().tolist()
        if len(classes) < 2:
            raise BadInput(f"{files.get('train') or tcfg.get('dataset') or tcfg.name}: the training data has one label "
                           f"class ({classes[:1]}); expected at least 2 (accuracy would be 1.0 by construction)")
        for key, frame in splits.items():
            frame["label"] = _label_ids(frame["label"], labels, f"{tcfg.name}:{key}", ints_are_ids=named)
    elif kind == "regression":
        for frame in splits.values():
            frame["label"] = frame["label"].astype(float)
    elif kind == "translation":
        for frame in splits.values():
            frame["label"] = frame["label"].astype(str)
    else:
        raise ValueError(f"task.kind={kind!r}: expected classification, regression, translation or synthetic")
    return TaskData(tcfg.name, kind, splits, labels, dropped)


BAD_ROWS_MAX_FRAC = 0.1  # above this share of empty rows a file is refused, not cleaned


def _empty(values: pd.Series) -> pd.Series:
    return values.isna() | values.astype(str).str.strip().eq("")


def drop_empty_rows(frame: pd.DataFrame, where: str) -> tuple[pd.DataFrame, int]:
    """Rows whose text or label is empty (missing, or only whitespace) mean nothing: an empty label would become a
    class of its own, an empty text an input of special tokens alone. A few (at most `BAD_ROWS_MAX_FRAC` of the
    file) are dropped with a one-line warning naming how many and which; more, or all, and the file is refused."""
    bad = _empty(frame["text"]) | _empty(frame["label"])
    n = int(bad.sum())
    if not n:
        return frame, 0
    rows = [int(i) + 2 for i in np.flatnonzero(bad.to_numpy())[:5]]  # file line numbers of a csv with a header
    what = "every row has" if n == len(frame) else f"{n} of {len(frame)} rows have"
    if n > BAD_ROWS_MAX_FRAC * len(frame):
        raise BadInput(f"{where}: {what} an empty text or label (first at lines {rows}); expected a text and a label "
                       f"in every row (up to {BAD_ROWS_MAX_FRAC:.0%} of rows may be empty: they are then dropped)")
    log.warning("%s: dropped %d of %d rows with an empty text or label (first at lines %s)", where, n, len(frame), rows)
    return frame[~bad].reset_index(drop=True), n


HOLDOUT = "heldout"  # the split carved from train by `task.holdout`: where a protocol selects settings
HOLDOUT_SEED = 20_231_800  # one fixed slice for every job of a sweep, whatever its `seed`


def holdout_size(holdout, n_train: int) -> int:
    """Examples `task.holdout` takes from a train split of `n_train`: a fraction in (0, 1) or a count ≥ 1; at least
    one example must be left to train on."""
    value = float(holdout)
    n = round(value * n_train) if value < 1 else int(value)
    if not (value > 0 and (value < 1 or value == int(value))) or not 1 <= n < n_train:
        raise BadInput(f"task.holdout={holdout}: expected a fraction in (0, 1) or a whole count that leaves train "
                       f"examples on both sides (the train split has {n_train})")
    return n


def holdout_split(train, holdout) -> dict:
    """{"train": ..., "heldout": ...}: `task.holdout` of the train split set aside — a fixed random slice
    (HOLDOUT_SEED, the same for every seed and setting of a sweep), the rest trains. A protocol chooses its settings
    on this slice (`lorafa.protocols`), never on the dev set it reports. No holdout: train as it is. `train` is a
    pandas frame or a `datasets.Dataset` (instruction data), and so are the two parts."""
    if not holdout:
        return {"train": train}
    # one permutation for frames and Datasets, not sklearn's or datasets' train_test_split: they draw other slices,
    # and the tuned rows in results/ chose on this one
    n = holdout_size(holdout, len(train))
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(train))

    def rows(idx):
        if isinstance(train, pd.DataFrame):
            return train.iloc[idx].reset_index(drop=True)
        return train.select(idx.tolist())

    return {"train": rows(np.sort(order[n:])), HOLDOUT: rows(np.sort(order[:n]))}


def alpaca_prompt(instruction: str, input_text: str | None = None) -> str:
    """The Alpaca template around one instruction (the no-input variant when the input is empty)."""
    if isinstance(input_text, str) and input_text.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _alpaca_columns(batch: dict, instruction: str, input_col: str | None, response: str) -> dict:
    """A batch of instruction records as `prompt` (the Alpaca template filled in) and `response` columns."""
    inputs = batch[input_col] if input_col else [None] * len(batch[instruction])
    return {"prompt": [alpaca_prompt(str(i), x) for i, x in zip(batch[instruction], inputs)],
            "response": [str(r) for r in batch[response]]}


def _load_instructions(tcfg: DictConfig) -> TaskData:
    """Instruction data (train split only) as a `datasets.Dataset` of `prompt` (the Alpaca template filled in) and
    `response` columns, formatted by a batched, cached `map`; with `task.streaming`, an `IterableDataset` formatted
    as it is read (nothing is read ahead but the first record, which checks the file)."""
    fmt = str(tcfg.get("format") or "alpaca")
    if fmt not in INSTRUCTION_FORMATS:
        raise BadInput(f"task.format={fmt!r}: expected one of {sorted(INSTRUCTION_FORMATS)}")
    streaming = bool(tcfg.get("streaming"))
    files = {k: str(v) for k, v in (tcfg.get("data_files") or {}).items() if v}
    if files.get("train"):
        data, columns = read_dataset(files["train"], "task.data_files.train", streaming=streaming)
        where = files["train"]
    elif tcfg.get("dataset"):
        data, where = _load_hub(tcfg, "train", streaming), f"{tcfg.dataset}:train"
        columns = list(data.column_names or next(iter(data), {}))
    else:
        raise BadInput(f"task {tcfg.name}: set task.data_files.train=FILE (json/jsonl with the {fmt} fields)")
    instruction, input_col, response = INSTRUCTION_FORMATS[fmt]
    missing = [c for c in (instruction, input_col, response) if c and c not in columns]
    if missing:
        raise BadInput(f"{where}: no column {missing} for task.format={fmt}; columns are {columns}")
    if tcfg.get("max_train_samples"):
        n = int(tcfg.max_train_samples)
        data = data.take(n) if streaming else data.select(range(min(n, len(data))))
    fields = {"instruction": instruction, "input_col": input_col, "response": response}
    if streaming:
        data = data.map(_alpaca_columns, batched=True, fn_kwargs=fields, remove_columns=columns)
        return TaskData(tcfg.name, "instruction", {"train": data}, None, streaming=True)
    data = data.map(_alpaca_columns, batched=True, fn_kwargs=fields, remove_columns=columns,
                    desc="instruction prompts")
    return TaskData(tcfg.name, "instruction", holdout_split(data, tcfg.get("holdout")), None)


def _label_set(values: pd.Series) -> list[str]:
    """The class names of a labelled file, read from the data: its distinct values, sorted."""
    uniques = values.unique().tolist()
    if all(isinstance(v, (int, np.integer)) for v in uniques):
        return [str(v) for v in sorted(uniques)]
    return sorted(str(v) for v in uniques)


def _label_ids(values: pd.Series, labels: list[str], where: str, ints_are_ids: bool) -> pd.Series:
    """Class indices of a label column: integer ids as they are when the task names its classes (GLUE's
    columns hold ids), else each value looked up by its string form in the label set."""
    if ints_are_ids and pd.api.types.is_integer_dtype(values):
        ids = values.astype(int)
        bad = sorted(set(ids[(ids < 0) | (ids >= len(labels))].tolist()))
    else:
        ids = values.astype(str).map({name: i for i, name in enumerate(labels)})
        bad = sorted(set(values[ids.isna()].astype(str)))
    if bad:
        raise BadInput(f"{where}: labels {[str(b) for b in bad[:10]]} are not in the task's label set {labels}")
    return ids.astype(int)


# ---------------------------------------------------------------------------------------------------- posing
# not transformers' DataCollatorWithPadding / DataCollatorForSeq2Seq: they pad through a tokenizer (synthetic data has
# none) to the longest or a multiple, not to a bucket capped at max_seq_len, and know no packed windows
def collate(features: list[dict], pad_id: int, pad_to: int | None = None,
            aligned_labels: bool = False, pad_labels_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` (pad_id, with an attention mask) and list-valued `labels` (-100); stack the rest.
    `pad_to` pads inputs to a fixed length (the measured steps use the task's max_seq_len; other steps a length
    bucket: `lorafa.step.bucket_length`); `aligned_labels` (decoders) pads labels to the inputs' width, since they
    run along the same positions; `pad_labels_to`, labels that are not aligned (T5's targets) to a bucket.
    Packed windows (`pack`: features with `position_ids`) get their padding as one more sequence of its own, its
    positions restarting at 0, so that transformers' packed-sequence mask keeps it apart from the real examples;
    their attention mask then only counts the real tokens (`lorafa.train.count_tokens`): the model must not be
    given it (`lorafa.train._inputs` drops it), since transformers looks for packed sequences only without one."""
    width = max(max(len(f["input_ids"]) for f in features), pad_to or 0)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in features[0]:
        pos = torch.arange(width).repeat(len(features), 1)
        for i, f in enumerate(features):
            n = len(f["position_ids"])
            pos[i, :n], pos[i, n:] = torch.tensor(f["position_ids"]), torch.arange(width - n)
        batch["position_ids"] = pos
    for key in features[0]:
        if key in ("input_ids", "position_ids"):
            continue
        values = [f[key] for f in features]
        if not isinstance(values[0], list):
            batch[key] = torch.tensor(values)
            continue
        label_width = width if aligned_labels else max(max(len(v) for v in values), pad_labels_to or 0)
        t = torch.full((len(values), label_width), -100, dtype=torch.long)
        for i, v in enumerate(values):
            t[i, : len(v)] = torch.tensor(v)
        batch[key] = t
    return batch


class Poser:
    """How one family is asked one task: `encode` examples into features, `predict` labels for a batch."""

    family: str

    def __init__(self, data: TaskData, tcfg: DictConfig, tokenizer):
        self.data, self.tcfg, self.tok = data, tcfg, tokenizer
        self.max_len = int(tcfg.max_seq_len)
        self._on_device: dict = {}  # device → the label words (`candidates`) as tensors

    def encode(self, frame: pd.DataFrame) -> list[dict]:
        raise NotImplementedError

    def truncated(self, frame: pd.DataFrame) -> int:
        """How many of `frame`'s examples `encode` cuts (an input longer than `task.max_seq_len`, a translation
        target longer than `task.target_len`, which generation cannot exceed): the row's `eval_truncated`."""
        return 0

    @torch.no_grad()
    def predict(self, model, batch) -> torch.Tensor:
        raise NotImplementedError

    # `score` reads no tensor value on the host and returns device tensors only: a CUDA graph can hold it
    # (`lorafa.step.TrainStep.eval_forward`)
    capturable = False

    @torch.no_grad()
    def score(self, model, inputs: dict, batch: dict, predict: bool):
        """One evaluation batch in as few forwards as the family allows: (its mean loss, a device tensor; with
        `predict`, its raw predictions — a device tensor that `finish` turns into labels or values once read, or
        generated text — else None). `inputs` are the model's inputs, `batch` the whole collated batch. An LM's loss
        is taken without its logits (`lorafa.loss.loss_only`); predictions come from forwards of their own."""
        with lm_loss.loss_only():
            loss = model(**inputs).loss
        return loss, (self.choose(model, batch) if predict else None)

    def choose(self, model, batch):
        """Raw predictions for a batch (`finish` makes them labels or values)."""
        return self.predict(model, batch)

    def finish(self, raw):
        """Predictions from what `score` or `choose` gave, once on the host."""
        return raw

    def _candidate_tensors(self, device) -> list[torch.Tensor]:
        """Each label's words (`self.candidates`, token ids) as a tensor on `device`: made once a device, before any
        capture (a graphed evaluation replays them)."""
        if device not in self._on_device:
            self._on_device[device] = [torch.tensor(c, device=device) for c in self.candidates]
        return self._on_device[device]

    @staticmethod
    def _log_p(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """log p(words) per row: `logits` (rows × L × vocab) at the positions that predict `words` (rows × L)."""
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), words.flatten(), reduction="none")
        return -nll.view(words.shape).sum(-1)

    def prompt(self, row) -> str:
        pair = row.get("text_pair")
        template = self.tcfg.get("prompt")
        if template:
            return template.format(text=row["text"], text_pair=pair if isinstance(pair, str) else "")
        return row["text"] if not isinstance(pair, str) else f"{row['text']}\n{pair}"

    def label_words(self) -> list[str]:
        """The words a text-to-text model answers with: class names, or a grid of values for regression."""
        if self.data.kind == "classification":
            return list(self.data.labels)
        lo, hi = self.tcfg.label_range
        step = float(self.tcfg.get("label_step", 0.2))
        return [f"{lo + i * step:.1f}" for i in range(round((hi - lo) / step) + 1)]

    def verbalise(self, label) -> str:
        if self.data.kind == "classification":
            return self.data.labels[int(label)]
        words = self.label_words()
        return min(words, key=lambda w: abs(float(w) - float(label)))  # T5's STS-B: round to the 0.2 grid

    def from_choice(self, choice: torch.Tensor) -> torch.Tensor:
        if self.data.kind == "classification":
            return choice
        grid = torch.tensor([float(w) for w in self.label_words()])
        return grid[choice.cpu()]


class EncoderPoser(Poser):
    family = "encoder"

    def encode(self, frame):
        pairs = frame["text_pair"].tolist() if "text_pair" in frame else None
        enc = self.tok(frame["text"].tolist(), pairs, truncation=True, max_length=self.max_len)
        return [{"input_ids": ids, "labels": label} for ids, label in zip(enc["input_ids"], frame["label"].tolist())]

    def truncated(self, frame):
        pairs = frame["text_pair"].tolist() if "text_pair" in frame else None
        lengths = self.tok(frame["text"].tolist(), pairs, truncation=False, verbose=False)["input_ids"]
        return int(sum(len(ids) > self.max_len for ids in lengths))

    capturable = True

    @torch.no_grad()
    def predict(self, model, batch):
        return self._from_logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)

    @torch.no_grad()
    def score(self, model, inputs, batch, predict):
        out = model(**inputs)  # the loss and the predictions from one forward
        return out.loss, (self._from_logits(out.logits) if predict else None)

    def _from_logits(self, logits):
        return logits.argmax(-1) if self.data.kind == "classification" else logits.squeeze(-1).float()


class Seq2SeqPoser(Poser):
    family = "encoder-decoder"

    def __init__(self, *args):
        super().__init__(*args)
        self.generates = self.data.kind == "translation"
        self.target_len = int(self.tcfg.get("target_len") or self.max_len)
        self.candidates = [] if self.generates else [self.tok(w)["input_ids"] for w in self.label_words()]

    @property
    def capturable(self):
        return not self.generates

    def encode(self, frame):
        rows = frame.to_dict("records")
        inputs = self.tok([self.prompt(r) for r in rows], truncation=True, max_length=self.max_len)["input_ids"]
        if self.generates:  # the reference text, cut at target_len tokens (as most En-Ro recipes do)
            targets = self.tok([r["label"] for r in rows], truncation=True, max_length=self.target_len)["input_ids"]
        else:
            targets = self.tok([self.verbalise(r["label"]) for r in rows])["input_ids"]
        return [{"input_ids": i, "labels": t} for i, t in zip(inputs, targets)]

    def truncated(self, frame):
        rows = frame.to_dict("records")
        inputs = self.tok([self.prompt(r) for r in rows], truncation=False, verbose=False)["input_ids"]
        cut = [len(ids) > self.max_len for ids in inputs]
        if self.generates:
            targets = self.tok([r["label"] for r in rows], truncation=False, verbose=False)["input_ids"]
            cut = [c or len(t) > self.target_len for c, t in zip(cut, targets)]
        return int(sum(cut))

    @torch.no_grad()
    def predict(self, model, batch):
        if self.generates:  # greedy decoding (task.num_beams for beam search), detokenised text
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=self.target_len, num_beams=int(self.tcfg.get("num_beams") or 1),
                                 do_sample=False)
            return self.tok.batch_decode(out, skip_special_tokens=True)
        return self.from_choice(self.choose(model, batch))

    @torch.no_grad()
    def score(self, model, inputs, batch, predict):
        if self.generates:
            return super().score(model, inputs, batch, predict)
        # the encoder run once, for the loss on the reference words and for scoring every label's words
        enc = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with lm_loss.loss_only():
            loss = model(encoder_outputs=enc, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        return loss, (self.choose(model, batch, enc) if predict else None)

    @torch.no_grad()
    def choose(self, model, batch, enc=None):
        """The index of the likeliest label words, log p(words | input), the encoder run once."""
        if self.generates:
            return self.predict(model, batch)
        if enc is None:
            enc = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        n = batch["input_ids"].shape[0]
        scores = []
        for cand in self._candidate_tensors(batch["input_ids"].device):
            labels = cand.expand(n, -1).contiguous()
            logits = model(encoder_outputs=enc, attention_mask=batch["attention_mask"], labels=labels).logits
            scores.append(self._log_p(logits, labels))  # log p(words | input)
        return torch.stack(scores, -1).argmax(-1)

    def finish(self, raw):
        return raw if self.generates else self.from_choice(raw)


class DecoderPoser(Poser):
    family = "decoder"

    def __init__(self, *args):
        super().__init__(*args)
        anchor = self.tok(ANSWER_CUE.strip(), add_special_tokens=False)["input_ids"]
        self.candidates = []
        for word in self.label_words():  # the word's tokens as they follow the cue, whatever the tokenizer
            full = self.tok(f"{ANSWER_CUE.strip()} {word}", add_special_tokens=False)["input_ids"]
            if full[: len(anchor)] != anchor:
                raise ValueError(f"cannot isolate the tokens of label {word!r} after {ANSWER_CUE!r}")
            self.candidates.append(full[len(anchor):] + [self.tok.eos_token_id])
        self.cue_len = len(self.tok(ANSWER_CUE, add_special_tokens=False)["input_ids"])

    def encode(self, frame):
        rows = frame.to_dict("records")
        prompts = self.tok([self.prompt(r) + ANSWER_CUE for r in rows])["input_ids"]
        answer_len = max(len(c) for c in self.candidates)
        budget = self.max_len - answer_len
        features = []
        for ids, r in zip(prompts, rows):
            if len(ids) > budget:  # cut the input text, keep the answer cue (counted by `truncated`)
                ids = ids[: budget - self.cue_len] + ids[-self.cue_len:]
            answer = self.candidates[self.label_words().index(self.verbalise(r["label"]))]
            features.append({"input_ids": ids + answer, "labels": [-100] * len(ids) + answer,
                             "prompt_len": len(ids)})
        return features

    def truncated(self, frame):
        prompts = self.tok([self.prompt(r) + ANSWER_CUE for r in frame.to_dict("records")], verbose=False)["input_ids"]
        budget = self.max_len - max(len(c) for c in self.candidates)
        return int(sum(len(ids) > budget for ids in prompts))

    @torch.no_grad()
    def predict(self, model, batch):
        return self.from_choice(self.choose(model, batch))

    # `label_scores` reads nothing on the host (tested under a simulated capture)
    capturable = True

    @torch.no_grad()
    def choose(self, model, batch):
        """The index of the likeliest label words after each prompt (`label_scores`)."""
        return self.label_scores(model, batch).argmax(-1)

    @torch.no_grad()
    def label_scores(self, model, batch) -> torch.Tensor:
        """log p(label words | prompt), rows × labels: each label's words written after every row's
        prompt (`prompt_len`) in the batch's own width — widened by the longest words' extra tokens over the
        shortest, so every row's words fit whatever its reference answer's length — one forward per label, each
        word's log-probability read at the position before it (the LM head run at those positions only:
        `logits_at`). Device operations on static shapes only, no host loop over rows. Positions past a row's words
        are masked; the model is causal, so they change nothing before them."""
        ids = batch["input_ids"]
        plen = batch["prompt_len"].to(ids.device)
        n = ids.shape[0]
        cands = self._candidate_tensors(ids.device)
        extra = max(len(c) for c in cands) - min(len(c) for c in cands)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.nn.functional.pad(ids, (0, extra), value=pad)
        pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
        scores = []
        for c in cands:
            at = plen[:, None] + torch.arange(len(c), device=ids.device)[None, :]  # (n, words): where they go
            seq = ids.scatter(1, at, c.expand(n, -1))  # what follows stays: masked, and after them
            mask = (pos < plen[:, None] + len(c)).long()
            before = logits_at(model, at - 1, input_ids=seq, attention_mask=mask)  # t is predicted at t-1
            scores.append(self._log_p(before, c.expand(n, -1)))
        return torch.stack(scores, -1)

    def finish(self, raw):
        return self.from_choice(raw)


def logits_at(model, index: torch.Tensor, **inputs) -> torch.Tensor:
    """A causal LM's logits at `index` (rows × k sequence positions, per row) only: rows × k × vocab, the model's
    own values there. The LM head (`get_output_embeddings`) is handed only those positions' hidden states, so the
    forward makes no rows × length × vocab logits (3.9 GiB in bf16 at 64 rows of 1,024 tokens and LLaMA's 32k
    vocabulary; 8 times that at Gemma's 256k) — what a model does to its logits after the head (soft-capping, a
    scale) acts on those as it would on all. Where the head does not run exactly once in the forward through that
    module, the whole logits are made and read at `index` instead. Device operations only: a graph can hold it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    calls = []

    def at(x: torch.Tensor) -> torch.Tensor:  # (rows × length × d) → rows × k × d
        return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))

    def rows_only(module, args, kwargs):
        calls.append(None)
        return None if len(calls) > 1 or not args else ((at(args[0]), *args[1:]), kwargs)

    if head is not None:
        handle = head.register_forward_pre_hook(rows_only, with_kwargs=True)
        try:
            logits = model(**inputs).logits
        finally:
            handle.remove()
        if len(calls) == 1 and logits.shape[:2] == index.shape:
            return logits
    return at(model(**inputs).logits)


class InstructionPoser(Poser):
    """Decoders on instruction data: the prompt, then the response and EOS; loss on the response tokens only
    (labels −100 over the prompt). Sequences longer than task.max_seq_len are cut at that length; with
    `task.packing`, whole examples share windows of that length, each attending only to itself (`pack`).

    A `datasets.Dataset` is tokenised by a batched `Dataset.map`, cached beside the dataset in datasets' cache
    (keyed by the data's and the function's fingerprints: tokenizer, max_seq_len), and read back memory-mapped
    (`Encoded`); an `IterableDataset` (`task.streaming`) is tokenised as it is read (`stream`)."""

    family = "decoder"

    def _tokenise(self):
        return partial(encode_instructions, tokenizer=self.tok, max_len=self.max_len)

    def encode(self, frame):
        if isinstance(frame, pd.DataFrame):  # a frame (a test's few records): tokenised in one batch
            out = self._tokenise()({"prompt": frame["prompt"].tolist(), "response": frame["response"].tolist()})
            features = [{"input_ids": i, "labels": t} for i, t in zip(out["input_ids"], out["labels"])]
        else:
            features = Encoded(frame.map(self._tokenise(), batched=True, remove_columns=frame.column_names,
                                         features=_token_features(), desc="tokenising"))
        return pack(list(features), self.max_len) if self.tcfg.get("packing") else features

    def stream(self, data, examples: int, seed: int) -> Stream:
        """`task.streaming`: the first `examples` training examples of `data` (an IterableDataset, read again from
        its start, reshuffled, when it has fewer), shuffled through a buffer of `task.shuffle_buffer` records, then
        tokenised in batches as they are read."""
        shuffled = data.shuffle(seed=seed, buffer_size=int(self.tcfg.get("shuffle_buffer") or 10_000))
        return Stream(shuffled.map(self._tokenise(), batched=True, remove_columns=["prompt", "response"],
                                   features=_token_features()), examples)


def _token_features():
    """The tokenised columns' types: int32 ids (half the cache of the int64 datasets would infer)."""
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids, "length": datasets.Value("int32")})


def encode_instructions(batch: dict, tokenizer, max_len: int) -> dict:
    """A batch of `prompt` / `response` records as token ids and labels (−100 over the prompt), cut at `max_len`; a
    record whose prompt fills the window teaches nothing and is dropped. `length`: each example's token count."""
    prompts = tokenizer(batch["prompt"])["input_ids"]  # with BOS, as the model will read it
    responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = {"input_ids": [], "labels": [], "length": []}
    for p, r in zip(prompts, responses):
        ids = (p + r + [eos])[:max_len]
        labels = ([-100] * len(p) + r + [eos])[:max_len]
        if any(t != -100 for t in labels):
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
    return out


class Encoded(Sequence):
    """Tokenised examples in an Arrow table (memory-mapped from datasets' cache), seen as the list of feature dicts
    that `lorafa.train.fit` reads (`features[i]`, `len`); `lengths`, every example's length, is read from one
    column rather than from every example."""

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):  # a list of examples, as a list's slice
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.table[int(i)]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}

    def __iter__(self):
        for batch in self.table.iter(batch_size=1000):
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                yield {"input_ids": ids, "labels": labels}

    @property
    def lengths(self) -> np.ndarray:
        return self.table.data.column("length").to_numpy()


class Stream:
    """Streamed training examples (`task.streaming`): `examples` feature dicts read from an IterableDataset in its
    order, as `lorafa.train.fit` asks for them — `features[i]` for growing i, each once; an index another process
    takes is read and passed over — so that no more than the stream's buffers is held. Where the data runs out
    first, it is read again from the start, reshuffled (`set_epoch`); `passes` counts the whole passes made."""

    lengths = ()  # not known before the examples are read

    def __init__(self, data, examples: int):
        self.data, self.examples = data, int(examples)
        self.passes, self._next, self._it, self._read = 0, 0, None, 0

    def __len__(self) -> int:
        return self.examples

    def __getitem__(self, i) -> dict:
        i = int(i)
        if not 0 <= i < self.examples:
            raise IndexError(f"example {i} of a stream of {self.examples}")
        if i < self._next:
            raise IndexError(f"example {i} of the stream was read already (a stream is read once, in order)")
        while True:
            feature = self._pull()
            self._next += 1
            if self._next - 1 == i:
                return {"input_ids": feature["input_ids"], "labels": feature["labels"]}

    def _pull(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self.data.set_epoch(self.passes)
                self._it, self._read = iter(self.data), 0
            feature = next(self._it, None)
            if feature is not None:
                self._read += 1
                return feature
            if not self._read:
                break
            self.passes, self._it = self.passes + 1, None
        raise BadInput("task.streaming=true: the training data gave no example (every prompt fills "
                       "task.max_seq_len, or the file is empty)")


def stream_examples(train: DictConfig, world_size: int = 1) -> int:
    """The examples a streamed job reads: train.max_steps optimizer steps of grad_accum micro-batches of
    batch_size examples on each of `world_size` processes."""
    return int(train.max_steps) * int(train.grad_accum) * int(train.batch_size) * int(world_size)


def check_streaming(cfg: DictConfig) -> None:
    """`task.streaming=true` reads the training data as it trains, without knowing its size or its examples'
    lengths: it needs `train.max_steps`, and what needs the whole data up front is refused (`BadInput`)."""
    if not cfg.task.get("streaming"):
        return
    if cfg.task.kind != "instruction":
        raise BadInput(f"task.streaming=true: task {cfg.task.name} is {cfg.task.kind}; only instruction tasks stream")
    if not (cfg.train.get("max_steps") and int(cfg.train.max_steps) > 0):
        raise BadInput("task.streaming=true needs train.max_steps=N (a stream's length is not known before it "
                       "is read, so epochs cannot be counted)")
    needs_all = {"task.packing": cfg.task.get("packing"), "task.holdout": cfg.task.get("holdout"),
                 "train.group_by_length": cfg.train.get("group_by_length"),
                 "train.checkpoint_every": cfg.train.get("checkpoint_every"), "train.resume": cfg.train.get("resume")}
    for key, value in needs_all.items():
        if value:
            raise BadInput(f"{key}={value}: not with task.streaming=true (it needs the whole training data up "
                           "front, or a saved position in it, which a stream does not keep); expected "
                           "task.streaming=false")


def pack(features: list[dict], width: int) -> list[dict]:
    """Whole examples (each BOS … EOS, at most `width` tokens) packed into windows of at most `width` tokens, no
    example split: best-fit decreasing (the longest example first, each into the window it fills best), the
    examples of a window in their original order. Each window carries `position_ids` restarting at 0 for each of
    its examples, and the first label of every example is -100 — transformers' padding-free format, as
    `DataCollatorWithFlattening` builds it — so that attention stays within an example and no example predicts
    across a boundary: the model gets the window without an attention mask, and transformers (masking_utils'
    `find_packed_sequence_indices`, SDPA and eager attention) makes the causal mask block-diagonal from the position
    ids, row by row. Each example's loss and gradient are then those of its unpacked forward (tests/test_packing.py).
    FlashAttention's packed path would need the whole batch as one row; this package runs SDPA (transformers'
    default)."""
    sizes = [len(f["input_ids"]) for f in features]
    if any(n > width for n in sizes):
        raise ValueError(f"pack: an example of {max(sizes)} tokens does not fit a window of {width}")
    windows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, window), sorted: the first with room ≥ n fits best
    for i in sorted(range(len(features)), key=lambda j: -sizes[j]):
        k = bisect.bisect_left(rooms, (sizes[i], -1))
        if k == len(rooms):
            windows.append([])
            room, w = width, len(windows) - 1
        else:
            room, w = rooms.pop(k)
        windows[w].append(i)
        bisect.insort(rooms, (room - sizes[i], w))
    packed = []
    for members in windows:
        ids, labels, positions = [], [], []
        for i in sorted(members):
            f = features[i]
            ids += f["input_ids"]
            labels += [-100] + f["labels"][1:]
            positions += list(range(sizes[i]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


class SyntheticPoser(Poser):
    """Random token sequences of exactly max_seq_len (and random targets): memory and speed, not accuracy."""

    def __init__(self, data, tcfg, family: str, vocab_size: int, seed: int):
        super().__init__(data, tcfg, None)
        self.family, self.vocab_size, self.seed = family, vocab_size, seed

    def make(self, n: int, offset: int) -> list[dict]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + offset)
        ids = torch.randint(5, self.vocab_size, (n, self.max_len), generator=g)
        if self.family == "encoder":
            labels = torch.randint(0, 2, (n,), generator=g).tolist()
        elif self.family == "encoder-decoder":
            labels = torch.randint(5, self.vocab_size, (n, int(self.tcfg.target_len)), generator=g).tolist()
        else:
            labels = ids.tolist()
        return [{"input_ids": i, "labels": lab} for i, lab in zip(ids.tolist(), labels)]


POSERS = {p.family: p for p in (EncoderPoser, Seq2SeqPoser, DecoderPoser)}


def poser_for(family: str, data: TaskData, tcfg: DictConfig, tokenizer=None, *, vocab_size=None,
              seed: int = 0) -> Poser:
    if data.kind == "synthetic":
        return SyntheticPoser(data, tcfg, family, vocab_size, seed)
    if data.kind == "translation" and family != "encoder-decoder":
        raise BadInput(f"task {tcfg.name} (translation) is posed to encoder-decoder models (T5) only; "
                       f"this model's family is {family}")
    if data.kind == "instruction":
        if family != "decoder":
            raise BadInput(f"task {tcfg.name} (instruction tuning, MMLU) is posed to decoder models (LLaMA) only; "
                           f"this model's family is {family}")
        return InstructionPoser(data, tcfg, tokenizer)
    return POSERS[family](data, tcfg, tokenizer)
