"""`task.packing=true` is exact: a packed window's examples attend only to themselves (per-example position ids,
no attention mask: transformers' padding-free path), so each example's loss is its unpacked forward's; and a job
with packing runs (offline, the shipped sample)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from lorafa import models, step, tasks, train

from .conftest import compose_cfg

OLD_MODEL_INPUTS = ("input_ids", "attention_mask", "labels")  # before packing passed position ids


@pytest.fixture(scope="module")
def sample():
    """The tiny LLaMA (random init, fp32, eval mode) and the instruction sample, encoded unpacked."""
    cfg = compose_cfg(["model=tiny-llama", "task=alpaca_mmlu_sample"])
    tok = models.load_tokenizer(cfg.model)
    data = tasks.load_data(cfg.task)
    plain = tasks.poser_for("decoder", data, cfg.task, tok).encode(data.splits["train"])
    torch.manual_seed(0)
    model = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32, tokenizer=tok).model.eval()
    return model, tok, plain


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The summed token losses of one sequence: position t predicts label t+1 (the model's shift), -100 ignored."""
    return float(F.cross_entropy(logits[:-1].double(), labels[1:], ignore_index=-100, reduction="sum"))


def _batch(tok, plain) -> tuple[list[dict], dict]:
    """The first 4 packed windows, collated as a job's measured step is (padded to max_seq_len)."""
    windows = tasks.pack(plain, 256)[:4]
    return windows, tasks.collate(windows, tok.pad_token_id, pad_to=256, aligned_labels=True)


@torch.no_grad()
def _packed_vs_unpacked(model, tok, plain, old: bool = False) -> dict[int, tuple[float, float]]:
    """Per example of one packed batch: (its loss summed from the packed forward's logits, its loss from its own
    unpacked forward). The batch reaches the model as in a job (`train._inputs`), or with `old` as the model
    inputs were before packing passed position ids (`OLD_MODEL_INPUTS`: one causal sequence a window)."""
    windows, batch = _batch(tok, plain)
    inputs = {k: batch[k] for k in OLD_MODEL_INPUTS} if old else train._inputs(batch)
    logits = model(**inputs).logits
    out = {}
    for row, w in enumerate(windows):
        n = len(w["input_ids"])
        starts = [i for i, p in enumerate(w["position_ids"]) if p == 0] + [n]
        for a, b in pairwise(starts):
            j = next(j for j, e in enumerate(plain) if e["input_ids"] == w["input_ids"][a:b])
            alone = model(input_ids=torch.tensor([plain[j]["input_ids"]])).logits[0]
            out[j] = (_loss_sum(logits[row, a:b], batch["labels"][row, a:b]),
                      _loss_sum(alone, torch.tensor(plain[j]["labels"])))
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_example_loses_what_it_loses_alone(sample, attention):
    """Each example's summed token loss, read off the packed batch's logits (several windows a batch, padding
    included), equals its own unpacked forward's within 1e-5; the model's mean loss over the packed batch is the
    mean over the examples' response tokens (no example predicts across a boundary). Without the position ids
    (the old packing: one causal sequence a window, attention across examples) the losses differ — the check
    that this test sees cross-example attention."""
    model, tok, plain = sample
    model.set_attn_implementation(attention)
    try:
        windows, batch = _batch(tok, plain)
        assert all(len(w["input_ids"]) < 256 for w in windows)  # every row padded: padding is part of the test
        pairs = _packed_vs_unpacked(model, tok, plain)
        assert len(pairs) >= 8
        gaps = {j: abs(p - u) for j, (p, u) in pairs.items()}
        assert max(gaps.values()) < 1e-5, gaps
        with torch.no_grad():
            mean = float(model(**train._inputs(batch)).loss)
        response = sum(sum(t != -100 for t in plain[j]["labels"][1:]) for j in pairs)
        assert mean * response == pytest.approx(sum(u for _, u in pairs.values()), rel=1e-6)
        crossed = _packed_vs_unpacked(model, tok, plain, old=True)
        assert max(abs(p - u) for p, u in crossed.values()) > 1e-2
    finally:
        model.set_attn_implementation("sdpa")


def test_a_packed_batch_counts_real_tokens_and_reaches_the_model_maskless(sample):
    _, tok, plain = sample
    windows = tasks.pack(plain, 256)[:2]
    batch = tasks.collate(windows, tok.pad_token_id, pad_to=256, aligned_labels=True)
    for row, w in enumerate(windows):  # the padding: one more sequence, its positions from 0
        n = len(w["position_ids"])
        assert batch["position_ids"][row].tolist() == w["position_ids"] + list(range(256 - n))
        assert batch["labels"][row, n:].eq(-100).all()
    assert train.count_tokens(batch, "decoder") == sum(len(w["input_ids"]) for w in windows)
    assert sorted(train._inputs(batch)) == ["input_ids", "labels", "position_ids"]
    unpacked = tasks.collate(plain[:2], tok.pad_token_id, aligned_labels=True)
    assert sorted(train._inputs(unpacked)) == ["attention_mask", "input_ids", "labels"]


def test_packing_runs_eager_never_in_a_graph(cfg_factory):
    """A captured step would be told no sequence is packed (`lorafa.step.unseen_capture`): packing keeps jobs
    eager."""
    mode, why = step.resolve_mode(cfg_factory("model=tiny-llama", "task=alpaca_mmlu_sample", "task.packing=true"),
                                  torch.device("cuda"), 100)
    assert mode == "none" and "task.packing" in why


@pytest.mark.slow
def test_a_packing_job_runs_and_feeds_the_model_packed_windows(cfg_factory, offline, monkeypatch):
    """`run(cfg)` with task=alpaca_mmlu_sample task.packing=true: an ok row; the training batches reached the model
    with position ids and no attention mask."""
    from lorafa.job import run

    seen = []
    real_inputs = train._inputs

    def spy(batch):
        out = real_inputs(batch)
        seen.append(sorted(out))
        return out

    monkeypatch.setattr(train, "_inputs", spy)
    cfg = cfg_factory("model=tiny-llama", "method=lorafa", "task=alpaca_mmlu_sample", "task.packing=true",
                      "train.epochs=1", "train.batch_size=4", "task.mmlu_limit=2")
    row = run(cfg)
    assert row["status"] == "ok", row["error"]
    data, tok = tasks.load_data(cfg.task), models.load_tokenizer(cfg.model)
    windows = tasks.poser_for("decoder", data, cfg.task, tok).encode(data.splits["train"])
    assert row["train_examples"] == len(windows) < len(data.splits["train"])  # the windows are what trains
    assert seen and all(keys == ["input_ids", "labels", "position_ids"] for keys in seen)
