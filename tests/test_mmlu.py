"""MMLU through lm-eval on the in-memory model: the local task files, the score against a direct computation, and
the instruction-tuning job end to end on the shipped sample (offline)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from lorafa import mmlu, models, sources
from lorafa.checks import BadInput

from .conftest import compose_cfg, undocumented

SAMPLE = sources.ASSETS / "mmlu_sample"


@pytest.mark.bad_input("MMLU data missing, or a length that cuts its prompts")
def test_local_files_become_one_lm_eval_task_per_subject(tmp_path):
    subjects = mmlu.local_tasks(SAMPLE, tmp_path)
    assert subjects == ["elementary_mathematics", "high_school_geography"]
    for s in subjects:
        task = yaml.safe_load((tmp_path / f"{s}.yaml").read_text())
        assert task["description"].endswith(f"about {s.replace('_', ' ')}.\n\n") and task["fewshot_split"] == "dev"
        assert task["doc_to_text"] == mmlu.PROMPT and task["doc_to_choice"] == ["A", "B", "C", "D"]
        assert len((tmp_path / f"{s}_dev.jsonl").read_text().splitlines()) == 5
        assert len((tmp_path / f"{s}_test.jsonl").read_text().splitlines()) == 7
    assert "lorafa_mmlu_local_high_school_geography" in (tmp_path / "_group.yaml").read_text()
    other = tmp_path / "one"
    other.mkdir()
    assert mmlu.local_tasks(SAMPLE, other, ["high_school_geography"]) == ["high_school_geography"]
    with pytest.raises(ValueError, match="not in"):
        mmlu.local_tasks(SAMPLE, tmp_path, ["astronomy"])
    pd.DataFrame({"question": ["q"], "subject": ["s"]}).to_json(tmp_path / "dev.jsonl", orient="records", lines=True)
    with pytest.raises(BadInput, match="no test"):
        mmlu.local_tasks(tmp_path, tmp_path)


@pytest.mark.slow
def test_lm_eval_score_equals_a_direct_zero_shot_computation():
    """0-shot, so the prompt is plain: the subject description, the question and its choices, "Answer:"; the
    prediction is the likeliest of " A" … " D". lm-eval's accuracy must equal ours on the same model."""
    cfg = compose_cfg(["model=tiny-llama", "task=alpaca_mmlu_sample", "task.num_fewshot=0"])
    torch.manual_seed(0)
    net = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32)
    tok = models.load_tokenizer(cfg.model)
    got = mmlu.evaluate(net.model, tok, cfg.task, torch.device("cpu"))
    test = pd.read_json(SAMPLE / "test.jsonl", lines=True)
    correct = {}
    with torch.no_grad():
        for r in test.itertuples():
            context = (f"The following are multiple choice questions (with answers) about "
                       f"{r.subject.replace('_', ' ')}.\n\n{r.question.strip()}\n"
                       + "".join(f"{letter}. {c}\n" for letter, c in zip("ABCD", r.choices)) + "Answer:")
            ctx = tok(context)["input_ids"]
            scores = []
            for letter in "ABCD":
                whole = tok(context + " " + letter)["input_ids"]
                cont = whole[len(ctx):]
                logp = net.model(torch.tensor([whole])).logits[0].log_softmax(-1)
                scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
            correct.setdefault(r.subject, []).append(int(max(range(4), key=scores.__getitem__) == r.answer))
    for subject, hits in correct.items():
        assert got["subjects"][subject] == pytest.approx(sum(hits) / len(hits)), subject
    assert got["mmlu_acc"] == pytest.approx(sum(map(sum, correct.values())) / len(test))
    assert got["mmlu_examples"] == len(test) == 14 and got["num_fewshot"] == 0


def _body(r) -> str:
    return f"{r.question.strip()}\n" + "".join(f"{x}. {c}\n" for x, c in zip("ABCD", r.choices)) + "Answer:"


def _header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _context(r, shots, header: str, answer=lambda d: " " + "ABCD"[d.answer]) -> str:
    """MMLU's k-shot prompt, written out: the subject header, each shot as its question + " " + its answer letter
    + a blank line, then the question itself up to "Answer:"."""
    return header + "".join(f"{_body(d)}{answer(d)}\n\n" for d in shots) + _body(r)


def _more_mmlu(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MMLU-format dev and test files in `root`: the shipped sample, 2 more dev questions of each of its subjects
    after its 5 (the shots are the first 5, not any 5), and a generated third subject (7 dev, 10 test questions):
    24 test questions in all."""
    columns = ["question", "subject", "choices", "answer"]
    dev, test = (pd.read_json(SAMPLE / f"{split}.jsonl", lines=True)[columns] for split in ("dev", "test"))
    extra = pd.DataFrame([("What is 4 + 4?", "elementary_mathematics", ["6", "7", "8", "9"], 2),
                          ("What is 3 × 5?", "elementary_mathematics", ["15", "12", "18", "10"], 0),
                          ("Which river flows through Cairo?", "high_school_geography",
                           ["Congo", "Nile", "Niger", "Zambezi"], 1),
                          ("Which country has the largest area?", "high_school_geography",
                           ["Canada", "China", "Russia", "Brazil"], 2)], columns=columns)
    rows = []
    for i in range(17):
        a, b = 3 + 2 * i, 11 + 3 * i
        choices = [str(a * b + d) for d in (0, 2, -2, 10)]
        choices[0], choices[i % 4] = choices[i % 4], choices[0]
        rows.append((f"What is {a} × {b}?", "college_mathematics", choices, i % 4))
    generated = pd.DataFrame(rows, columns=columns)
    dev = pd.concat([dev, extra, generated.head(7)], ignore_index=True)
    test = pd.concat([test, generated.tail(10)], ignore_index=True)
    for split, frame in (("dev", dev), ("test", test)):
        frame.to_json(root / f"{split}.jsonl", orient="records", lines=True, force_ascii=False)
    return dev, test


@pytest.mark.slow
def test_lm_eval_five_shot_predictions_equal_a_direct_five_shot_computation(tmp_path, monkeypatch, offline):
    """At the jobs' k (5-shot), on a random-init tiny LLaMA with weights large enough that its answer depends on
    the whole prompt: every question's prediction through `mmlu.evaluate` (lm-eval) equals the likeliest of
    " A" … " D" after MMLU's 5-shot prompt written out here (subject header, the subject's first 5 dev questions in
    order, each answered " <letter>"), and so do the accuracies. The model is shown to tell prompts apart: 0 shots,
    other shots, another order, another header or other answer formatting change some of its answers."""
    import lm_eval

    dev, test = _more_mmlu(tmp_path)
    cfg = compose_cfg(["model=tiny-llama", "task=alpaca_mmlu_sample", f"task.mmlu_path={tmp_path}"])
    assert cfg.task.num_fewshot == compose_cfg(["task=alpaca_mmlu"]).task.num_fewshot == 5  # the jobs' k
    net = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32)
    tok = models.load_tokenizer(cfg.model)
    model = net.model.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # init std 0.02 answers "D" to every prompt; std 0.3 reads the prompt
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3, generator=generator)

    real, logged = lm_eval.simple_evaluate, {}

    def keep_samples(*args, **kwargs):  # the same call, its per-question results kept
        logged.update(real(*args, **{**kwargs, "log_samples": True}))
        return logged

    monkeypatch.setattr(lm_eval, "simple_evaluate", keep_samples)
    got = mmlu.evaluate(model, tok, cfg.task, torch.device("cpu"))

    def scores(context: str) -> list[float]:  # log P(" A" | context) … log P(" D" | context)
        ctx = tok(context)["input_ids"]
        out = []
        for letter in "ABCD":
            whole = tok(f"{context} {letter}")["input_ids"]
            assert whole[:len(ctx)] == ctx
            logp = model(torch.tensor([whole])).logits[0, len(ctx) - 1:-1].log_softmax(-1)
            out.append(sum(float(logp[i, t]) for i, t in enumerate(whole[len(ctx):])))
        return out

    def predict(context: str) -> int:  # the likeliest letter, in one forward (each letter is one token here)
        ctx = tok(context)["input_ids"]
        wholes = [tok(f"{context} {letter}")["input_ids"] for letter in "ABCD"]
        assert all(w[:-1] == ctx for w in wholes)
        return int(model(torch.tensor([ctx])).logits[0, -1, [w[-1] for w in wholes]].argmax())

    shots = {s: list(dev[dev["subject"] == s].itertuples()) for s in set(test["subject"])}
    prompts, ours, theirs, hits = [], [], [], {}
    with torch.no_grad():
        for subject, questions in test.groupby("subject", sort=False):
            samples = sorted(logged["samples"][f"{mmlu.LOCAL_GROUP}_{subject}"], key=lambda x: x["doc_id"])
            assert len(samples) == len(questions)
            for r, sample in zip(questions.itertuples(), samples):
                assert sample["doc"]["question"] == r.question
                prompts.append((r, _context(r, shots[subject][:5], _header(subject))))
                s = scores(prompts[-1][1])
                ours.append((r.question, max(range(4), key=s.__getitem__), s))
                lls = [float(ll) for ll, _ in sample["filtered_resps"]]
                theirs.append((r.question, max(range(4), key=lls.__getitem__), lls, sample["arguments"]))
                hits.setdefault(subject, []).append(int(ours[-1][1] == r.answer))
    assert len(ours) == len(test) == 24
    assert [(q, p) for q, p, _ in ours] == [(q, p) for q, p, _, _ in theirs]  # every question's answer
    for subject, h in hits.items():
        assert got["subjects"][subject] == pytest.approx(sum(h) / len(h)), subject
    assert got["mmlu_acc"] == pytest.approx(sum(map(sum, hits.values())) / len(test))
    assert got["mmlu_examples"] == 24 and got["num_fewshot"] == 5 and got["mmlu_truncated"] == 0
    for (_, _, s), (_, _, lls, _) in zip(ours, theirs):  # the same numbers, from the same prompt
        assert lls == pytest.approx(s, abs=1e-3)
    for (_, context), (_, _, _, arguments) in zip(prompts, theirs):
        assert [tuple(a) for a in arguments] == [(context, f" {x}") for x in "ABCD"]

    # the model reads the prompt: its answers vary, and each way of getting the prompt wrong changes some
    predicted = [p for _, p, _ in ours]
    assert len(set(predicted)) >= 3, predicted
    wrong = {"0-shot": lambda r, k: _context(r, [], _header(r.subject)),
             "shots reversed": lambda r, k: _context(r, k[:5][::-1], _header(r.subject)),
             "dev questions 3-7": lambda r, k: _context(r, k[2:7], _header(r.subject)),
             "no subject header": lambda r, k: _context(r, k[:5], ""),
             "header with underscores": lambda r, k: _context(r, k[:5], _header(r.subject).replace(
                 r.subject.replace("_", " "), r.subject)),
             "answers with no space": lambda r, k: _context(r, k[:5], _header(r.subject),
                                                            lambda d: "ABCD"[d.answer]),
             "answers as the choice text": lambda r, k: _context(r, k[:5], _header(r.subject),
                                                                 lambda d: f" {d.choices[d.answer]}")}
    with torch.no_grad():
        for name, make in wrong.items():
            changed = sum(predict(make(r, shots[r.subject])) != p for (r, _), p in zip(prompts, predicted))
            assert changed > 0, name


@pytest.mark.bad_input("the hub out of reach")
@pytest.mark.bad_input("MMLU data missing, or a length that cuts its prompts")
@pytest.mark.slow
def test_instruction_tuning_then_mmlu_end_to_end_offline(cfg_factory, offline):
    """`python run.py model=tiny-llama method=lorafa task=alpaca_mmlu_sample`, as run(cfg): an ok row scored by
    MMLU 5-shot, per-subject accuracies beside it; the real tasks are refused (bad input) saying what to set."""
    from lorafa.job import MMLU_FILE, run

    cfg = cfg_factory("model=tiny-llama", "method=lorafa", "task=alpaca_mmlu_sample", "train.epochs=1")
    row = run(cfg)
    assert row["status"] == "ok", row["error"]
    assert row["metric"] == "mmlu_acc" and 0.0 <= row["score"] <= 1.0 and row["eval_mmlu_acc"] == row["score"]
    assert not undocumented(row), f"columns docs/measurement.md does not list: {undocumented(row)}"
    side = json.loads((Path(cfg.output_dir) / MMLU_FILE).read_text())
    assert set(side["subjects"]) == {"elementary_mathematics", "high_school_geography"} and side["num_fewshot"] == 5
    assert row["score"] == pytest.approx(sum(side["subjects"].values()) / 2)  # 7 questions each
    assert row["train_examples"] == 16 and row["mem_activations_gib"] > 0 and row["trainable_params"] > 0
    with pytest.raises(BadInput, match="tatsu-lab/alpaca"):  # bad input (the hub out of reach): no row
        run(cfg_factory("model=tiny-llama", "method=lorafa", "task=alpaca_mmlu"))
    started = time.perf_counter()
    with pytest.raises(BadInput, match="task.mmlu_path"):  # refused before training, not after
        run(cfg_factory("model=tiny-llama", "method=lorafa", "task=alpaca_mmlu", "train.max_steps=1",
                        f"task.data_files.train={sources.asset('alpaca_sample/alpaca.json')}", "task.max_seq_len=128"))
    assert time.perf_counter() - started < 5


def test_the_sample_is_never_the_real_task():
    real, sample = (OmegaConf.to_container(compose_cfg([f"task={t}"]).task, resolve=True)
                    for t in ("alpaca_mmlu", "alpaca_mmlu_sample"))
    assert sample["name"] != real["name"] and real["mmlu_path"] is None and real["data_files"]["train"] is None
    assert real["dataset"] == "tatsu-lab/alpaca" and real["max_seq_len"] == 2048 and real["num_fewshot"] == 5


@pytest.mark.bad_input("MMLU data missing, or a length that cuts its prompts")
@pytest.mark.slow
def test_mmlu_runs_at_the_model_context_and_counts_the_prompts_it_cuts(cfg_factory, offline):
    """Trained on 128-token sequences, MMLU still reads whole 5-shot prompts (the model's 512 positions); an explicit
    shorter mmlu_max_length cuts prompts, and the row counts them; one shorter than a 0-shot prompt is refused
    before training."""
    from lorafa.job import run

    common = ("model=tiny-llama", "method=lorafa", "task=alpaca_mmlu_sample", "train.max_steps=1",
              "task.max_seq_len=128")
    row = run(cfg_factory(*common))
    assert row["status"] == "ok" and row["eval_truncated"] == 0 and row["eval_max_length"] == 512
    cfg = cfg_factory(*common)
    tok = models.load_tokenizer(cfg.model)
    dev, test = (pd.read_json(SAMPLE / f"{s}.jsonl", lines=True) for s in ("dev", "test"))

    def body(r):
        return f"{r.question.strip()}\n" + "".join(f"{x}. {c}\n" for x, c in zip("ABCD", r.choices)) + "Answer:"

    lengths = []
    for r in test.itertuples():  # lm-eval's 5-shot context: description, 5 answered dev questions, the question
        shots = [f"{body(d)} {'ABCD'[d.answer]}" for d in dev[dev["subject"] == r.subject].head(5).itertuples()]
        context = (f"The following are multiple choice questions (with answers) about "
                   f"{r.subject.replace('_', ' ')}.\n\n" + "\n\n".join([*shots, body(r)]))
        lengths.append(len(tok(context + " A")["input_ids"]))
    cut = sorted(lengths)[len(lengths) // 2]  # about half the prompts longer than this
    row = run(cfg_factory(*common, f"task.mmlu_max_length={cut - 1}"))
    assert row["eval_max_length"] == cut - 1
    assert row["eval_truncated"] == sum(n > cut for n in lengths) > 0
    started = time.perf_counter()
    with pytest.raises(BadInput, match="shorter than the longest 0-shot MMLU prompt"):
        run(cfg_factory(*common, "task.mmlu_max_length=16"))
    assert time.perf_counter() - started < 5


@pytest.mark.bad_input("MMLU data missing, or a length that cuts its prompts")
def test_an_explicit_mmlu_length_must_hold_every_zero_shot_prompt():
    """lm-eval keeps max_length + 1 tokens of context and answer: the refusal starts exactly where it would cut."""
    cfg = compose_cfg(["model=tiny-llama", "task=alpaca_mmlu_sample"])
    tok = models.load_tokenizer(cfg.model)
    longest = mmlu.check_max_length(cfg.task, tok)  # null: nothing to refuse
    test = pd.read_json(SAMPLE / "test.jsonl", lines=True)
    assert len(mmlu.zero_shot_prompts(cfg.task)) == len(test) and longest > 20
    cfg.task.mmlu_max_length = longest - 1
    assert mmlu.check_max_length(cfg.task, tok) == longest
    cfg.task.mmlu_max_length = longest - 2
    with pytest.raises(BadInput, match=f"expected ≥ {longest - 1}"):
        mmlu.check_max_length(cfg.task, tok)
