"""Rebuild the data and tokenizers that ship inside lorafa (they are committed; this documents how).

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader
    python -m lorafa.assets.build /tmp/vader/vaderSentiment-3.3.2.tar.gz

Source: the sdist of vaderSentiment 3.3.2 (MIT) carries `additional_resources/hutto_ICWSM_2014.tar.gz`, whose
`movieReviewSnippets_GroundTruth.txt` holds 10,605 sentences of Pang & Lee's movie reviews with the mean of
≥ 20 human sentiment ratings in [-4, 4]. See `lorafa/assets/README.md` for licence and citation.

Outputs (deterministic):
- `movie_polarity/{train,validation,test}.csv`: columns id, text, label (negative|positive), rating. The label is
  the sign of the mean rating; the 37 sentences rated exactly 0 are dropped. 1,000 validation, 1,000 test, the
  rest train, by a fixed permutation (seed 0).
- `tokenizers/tiny-{roberta,t5,llama}/`: one byte-level BPE (4,096 tokens, trained on the train split only) with
  each family's special-token layout, so the random-init tiny models tokenise offline exactly like real ones.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import tarfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
VOCAB_SIZE = 4096
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, RoBERTa's order
N_VALIDATION = N_TEST = 1000


def read_snippets(sdist: Path) -> list[dict]:
    with tarfile.open(sdist) as outer:
        inner_bytes = outer.extractfile(
            next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        ).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        text = inner.extractfile(MEMBER).read().decode("utf-8")
    rows = []
    for line in text.splitlines():
        idx, rating, sentence = line.split("\t")
        rating = float(rating)
        if rating == 0.0:
            continue
        rows.append({"id": int(idx), "text": sentence.strip(), "label": "positive" if rating > 0 else "negative",
                     "rating": rating})
    return rows


def write_splits(rows: list[dict], out: Path) -> dict[str, list[dict]]:
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    shuffled = [rows[i] for i in order]
    splits = {
        "validation": shuffled[:N_VALIDATION],
        "test": shuffled[N_VALIDATION:N_VALIDATION + N_TEST],
        "train": shuffled[N_VALIDATION + N_TEST:],
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "text", "label", "rating"])
            writer.writeheader()
            writer.writerows(part)  # shuffled order: the source lists all positives first
    return splits


def build_tokenizers(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    base.train_from_iterator(texts, trainer=trainer)
    assert base.get_vocab_size() == VOCAB_SIZE, base.get_vocab_size()
    bos, eos = ("<s>", 0), ("</s>", 2)
    post = {  # how each family's real tokenizer frames one text or a pair
        "tiny-roberta": processors.RobertaProcessing(eos, bos, trim_offsets=False),
        "tiny-t5": processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[eos]),
        "tiny-llama": processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[bos]),
    }
    for name, processor in post.items():
        tok = Tokenizer.from_str(base.to_str())
        tok.post_processor = processor
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>", mask_token="<mask>", model_max_length=512)
        fast.save_pretrained(out / name)
        # transformers 5 writes its own class name; the alias loads under 4.x and 5.x alike
        config_path = out / name / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", type=Path, help="vaderSentiment-3.3.2.tar.gz (the source distribution)")
    args = parser.parse_args()
    rows = read_snippets(args.sdist)
    splits = write_splits(rows, ASSETS / "movie_polarity")
    build_tokenizers([r["text"] for r in splits["train"]], ASSETS / "tokenizers")
    print({k: len(v) for k, v in splits.items()})


if __name__ == "__main__":
    main()
