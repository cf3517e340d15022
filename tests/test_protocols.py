"""The LoRA-FA recipe's knob (B's learning-rate ratio), the held-out slice, lr selection (protocol=tuned) and the
truncation count of evaluation."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lorafa import adapters, protocols, tasks
from lorafa.checks import BadInput
from lorafa.job import run
from lorafa.train import make_optimizer


# ------------------------------------------------------------------------------------- B's learning-rate ratio
def _two_layer(train_a: bool, init_a="kaiming", precondition_b=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    model[0].requires_grad_(False)
    model[0] = adapters.LoRALinear(model[0], rank=4, alpha=8, train_a=train_a, init_a=init_a,
                                   precondition_b=precondition_b)
    return model


def test_optimizer_gives_b_its_ratio_and_everything_else_the_base_lr():
    model = _two_layer(train_a=True)
    tcfg = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8})
    opt = make_optimizer(model, tcfg, b_lr_ratio=8.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    layer = model[0]
    assert lr_of[id(layer.lora_B)] == pytest.approx(8e-3)
    assert lr_of[id(layer.lora_A)] == pytest.approx(1e-3) and lr_of[id(model[2].weight)] == pytest.approx(1e-3)
    assert decay_of[id(layer.lora_B)] == 0.1 and decay_of[id(model[2].bias)] == 0.0  # decay as before
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())
    # the protocol's lr replaces train.lr as the base
    opt = make_optimizer(model, tcfg, b_lr_ratio=8.0, lr=2e-3)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx(sorted([2e-3] * (len(opt.param_groups) - 1) + [1.6e-2]))


def _train(model, ratio, steps=25, lr=1e-2):
    tcfg = OmegaConf.create({"lr": lr, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-16})
    opt = make_optimizer(model, tcfg, b_lr_ratio=ratio)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 24, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_for_lorafa_under_adam_b_lr_ratio_is_the_scale_of_a():
    """Why the recipe is one knob: with A frozen, ΔW = s·B·A and Adam's update of B does not depend on the gradient's
    scale, so training B at k × lr traces the same ΔW as A scaled by k (or α by k) at lr — the init scale of A and
    rsLoRA's α/√r are this knob too. (The head trains at lr in both.)"""
    k = 8.0
    ratio = _train(_two_layer(train_a=False), ratio=k)
    scaled = _two_layer(train_a=False)
    with torch.no_grad():
        scaled[0].lora_A.mul_(k)
    same = _train(scaled, ratio=1.0)
    np.testing.assert_allclose(ratio, same, rtol=1e-9)
    plain = _train(_two_layer(train_a=False), ratio=1.0)
    assert abs(plain[-1] - ratio[-1]) > 1e-3  # and the ratio is not a no-op


def test_lorafa_v2_equals_v1_under_adam_unless_the_rows_of_a_are_correlated():
    """v2 multiplies B's gradient by (A Aᵀ)⁻¹/s². Adam divides each coordinate by its own running scale, so a
    diagonal A Aᵀ — orthonormal rows, or rows of any lengths that are orthogonal — changes nothing; Kaiming rows
    (d_in ≫ r) are nearly orthogonal. v2 is another update only where A's rows are correlated (a trained A)."""
    def pair(edit):
        runs = []
        for pre in (False, True):
            model = _two_layer(train_a=False, init_a="orthogonal", precondition_b=pre)
            with torch.no_grad():
                edit(model[0].lora_A)
            runs.append(_train(model, ratio=1.0))
        return runs

    v1, v2 = pair(lambda a: None)
    np.testing.assert_allclose(v1, v2, rtol=1e-8)
    v1, v2 = pair(lambda a: a[0].mul_(10.0))  # rows of different lengths: A Aᵀ still diagonal
    np.testing.assert_allclose(v1, v2, rtol=1e-8)
    v1, v2 = pair(lambda a: a[1].add_(2.0 * a[0]))  # correlated rows
    assert abs(v1[-1] - v2[-1]) > 1e-3


def test_shipped_lorafa_defaults_are_the_recipe(cfg_factory):
    lora, lorafa, v2 = (cfg_factory(f"method={m}") for m in ("lora", "lorafa", "lorafa_v2"))
    assert lorafa.train.lr == lora.train.lr == v2.train.lr  # LoRA's learning rate ...
    assert lora.method.b_lr_ratio == 1.0
    assert lorafa.method.b_lr_ratio == v2.method.b_lr_ratio > 1.0  # ... with B faster


def test_b_lr_ratio_reaches_the_job_and_its_row(cfg_factory):
    common = ("model=tiny-roberta", "task=synthetic", "train.max_steps=3", "task.num_train=32", "task.num_eval=8")
    rows = {r: run(cfg_factory("method=lorafa", f"method.b_lr_ratio={r}", *common)) for r in (1.0, 8.0)}
    assert rows[8.0]["b_lr_ratio"] == 8.0 and rows[1.0]["b_lr_ratio"] == 1.0
    assert rows[8.0]["loss_curve"][-1] != rows[1.0]["loss_curve"][-1]  # B moved faster


# ---------------------------------------------------------------------------------------------- held-out slice
@pytest.mark.bad_input("task.holdout out of range")
def test_holdout_is_one_fixed_slice_of_train_whatever_the_seed():
    train = pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": [i % 2 for i in range(100)]})
    a, b = tasks.holdout_split(train, 0.1), tasks.holdout_split(train, 10)
    assert len(a["heldout"]) == 10 and len(a["train"]) == 90
    assert a["heldout"].equals(b["heldout"])
    assert set(a["heldout"]["text"]).isdisjoint(a["train"]["text"])
    assert sorted([*a["heldout"]["text"], *a["train"]["text"]]) == sorted(train["text"])
    assert list(a["heldout"]["text"]) != [f"t{i}" for i in range(10)]  # a random slice, not the head of the file
    assert tasks.holdout_split(train, None) == {"train": train}
    for bad in (1.5, 100, -0.1):
        with pytest.raises(BadInput, match="task.holdout"):
            tasks.holdout_split(train, bad)


def test_a_tuned_job_scores_the_heldout_slice_and_trains_without_it(cfg_factory):
    cfg = cfg_factory("protocol=tuned", "protocol.lr_scale=2", "train.max_steps=2", "task.max_train_samples=80",
                      "task.max_eval_samples=16", "task.holdout=20")
    row = run(cfg)
    assert row["status"] == "ok" and row["protocol"] == "tuned"
    assert row["heldout_examples"] == 20 and row["train_examples"] == 60
    assert 0.0 <= row["heldout_score"] <= 1.0 and math.isfinite(row["heldout_loss"])
    assert row["lr"] == pytest.approx(2 * float(cfg.train.lr)) and row["lr_scale"] == 2.0
    assert "heldout: 20 of 80" in row["selection_split"]


# ----------------------------------------------------------------------------------------------------- selection
def _grid_rows(scores: dict[float, list[float]], method="lora", dev_offset=0.0, group="g1", status=None):
    rows = []
    for lr, per_seed in scores.items():
        for seed, s in enumerate(per_seed):
            rows.append({"protocol": "tuned", "selection_group": group, "method": method, "model": "m", "task": "t",
                         "metric": "accuracy", "lr": lr, "lr_scale": lr / 1e-3, "seed": seed,
                         "status": (status or {}).get((lr, seed), "ok"), "heldout_score": s,
                         "heldout_loss": 1 - s, "score": s + dev_offset, "b_lr_ratio": 1.0})
    return pd.DataFrame(rows)


def test_selection_takes_the_best_mean_heldout_score_never_the_dev_score():
    table = _grid_rows({5e-4: [0.80, 0.82, 0.81], 1e-3: [0.84, 0.83, 0.85], 2e-3: [0.86, 0.70, 0.80]})
    table.loc[table["lr"] == 5e-4, "score"] = 0.99  # the dev set's favourite must not matter
    out = protocols.select(table)
    assert (out["selected_lr"] == 1e-3).all()
    assert out["selection_score"].iloc[0] == pytest.approx(0.84)
    assert out["lr_grid"].iloc[0] == "0.0005,0.001,0.002"
    assert out.loc[out["selected"], "lr"].tolist() == [1e-3] * 3


def test_an_lr_that_diverged_on_one_seed_is_never_selected():
    table = _grid_rows({1e-3: [0.80, 0.80, 0.80], 4e-3: [0.90, 0.90, 0.90]}, status={(4e-3, 2): "diverged"})
    assert (protocols.select(table)["selected_lr"] == 1e-3).all()


def test_groups_select_apart_and_untuned_rows_are_left_alone():
    a = _grid_rows({1e-3: [0.8], 2e-3: [0.9]}, group="a")
    b = _grid_rows({1e-3: [0.9], 2e-3: [0.8]}, group="b")
    plain = _grid_rows({1e-3: [0.5]}, group="c").assign(protocol="none")
    out = protocols.select(pd.concat([a, b, plain], ignore_index=True))
    assert out.groupby("selection_group")["selected_lr"].first().dropna().to_dict() == {"a": 2e-3, "b": 1e-3}
    assert not out.loc[out["protocol"] == "none", "selected"].any()


def test_selection_group_ignores_seed_and_lr_only(cfg_factory):
    base = protocols.selection_group(cfg_factory("protocol=tuned"))
    assert base == protocols.selection_group(cfg_factory("protocol=tuned", "seed=3", "protocol.lr_scale=4",
                                                         "train.lr=1e-2"))
    assert base != protocols.selection_group(cfg_factory("protocol=tuned", "method.b_lr_ratio=2"))
    assert base != protocols.selection_group(cfg_factory("protocol=tuned", "method=lora"))


def test_compare_pairs_lorafa_with_lora_by_seed_in_both_views():
    lora = _grid_rows({1e-3: [0.80, 0.81, 0.82], 2e-3: [0.85, 0.86, 0.87]}, method="lora", group="l")
    fa = _grid_rows({1e-3: [0.79, 0.80, 0.81], 2e-3: [0.70, 0.70, 0.70]}, method="lorafa", group="f")
    table = pd.concat([lora, fa], ignore_index=True)
    cmp = protocols.compare(table)
    default = cmp[cmp["view"] == "default"].set_index("method")
    chosen = cmp[cmp["view"] == "selected"].set_index("method")
    assert default.loc["LoRA-FA (B ×1)", "lr"] == "0.001" and chosen.loc["LoRA", "lr"] == "0.002"
    assert default.loc["LoRA-FA (B ×1)", "− LoRA [95 % CI]"].startswith("-1.00 [")  # −1 point on each of 3 seeds
    assert chosen.loc["LoRA-FA (B ×1)", "− LoRA [95 % CI]"].startswith("-6.00 [")  # 80 vs 86 at each one's own lr


# ---------------------------------------------------------------------------------------- truncated evaluation
def test_eval_truncated_counts_the_eval_inputs_cut_to_max_seq_len(cfg_factory):
    row = run(cfg_factory("method=lora", "train.max_steps=1", "task.max_train_samples=32",
                          "task.max_eval_samples=200", "task.max_seq_len=16"))
    frame = pd.read_csv(cfg_factory().task.data_files.validation).head(200)
    from lorafa import models

    tok = models.load_tokenizer(cfg_factory().model)
    expected = sum(len(ids) > 16 for ids in tok(frame["text"].tolist())["input_ids"])
    assert row["eval_truncated"] == expected > 0
    row = run(cfg_factory("method=lora", "train.max_steps=1", "task.max_train_samples=32",
                          "task.max_eval_samples=200", "task.max_seq_len=128"))
    assert row["eval_truncated"] == 0


@pytest.mark.parametrize("experiment", ["glue_roberta", "glue_t5", "llama_mmlu", "tuned_compare"])
def test_paper_experiments_run_in_tuned_mode(experiment):
    """`python run.py -m experiments=<paper table> protocol=tuned`: the table's sweep, each method over the lr grid
    around its own (paper) lr, on a held-out slice of train; LoRA-FA keeps LoRA's lr with B at its ratio."""
    from tests.test_experiments import compose_experiment, sweep_params

    extra = () if experiment == "tuned_compare" else ("protocol=tuned",)
    cfg = compose_experiment(experiment, *extra)
    params = sweep_params(cfg)
    assert params["protocol.lr_scale"] == ["0.25", "0.5", "1", "2", "4"] and len(params["seed"]) >= 3
    assert cfg.protocol.name == "tuned" and cfg.task.holdout == 0.1
    plain = sweep_params(compose_experiment(experiment)) if extra else {}
    assert all(params[k] == v for k, v in plain.items() if k != "seed")  # the table's own sweep is kept
    lrs = {}
    for method in ("lora", "lorafa"):
        job = compose_experiment(experiment, *extra, f"method={method}")
        lrs[method] = (float(job.train.lr), float(job.method.b_lr_ratio))
    assert lrs["lorafa"][0] == lrs["lora"][0] and lrs["lorafa"][1] > lrs["lora"][1] == 1.0


def test_notebooks_read_the_final_runs_of_a_tuned_sweep():
    from lorafa import report

    lora = _grid_rows({1e-3: [0.80, 0.81], 2e-3: [0.85, 0.86]}, method="lora", group="l")
    table = pd.concat([lora, _grid_rows({1e-3: [0.5]}, group="x").assign(protocol="none")], ignore_index=True)
    table["experiment"] = "glue_roberta"
    got = report.rows(table, "glue_roberta")
    assert sorted(got["lr"]) == [1e-3, 2e-3, 2e-3]  # the untuned row, and the tuned grid's selected lr only
    assert len(report.rows(table, "glue_roberta", tuned="all")) == 5


@pytest.mark.parametrize("model,task", [("tiny-t5", "wmt16_en_ro_sample"), ("tiny-llama", "movie_polarity"),
                                        ("tiny-t5", "movie_polarity")])
def test_every_poser_counts_what_it_cuts(cfg_factory, model, task):
    """T5 translation: inputs past max_seq_len or references past target_len (generation stops there); decoders:
    prompts cut to fit the answer into max_seq_len; T5 label scoring: inputs past max_seq_len."""
    from lorafa import models

    seq = 128 if task == "wmt16_en_ro_sample" else 12  # translation: only the references are cut
    cfg = cfg_factory(f"model={model}", f"task={task}", f"task.max_seq_len={seq}", "++task.target_len=10")
    data = tasks.load_data(cfg.task)
    tok = models.load_tokenizer(cfg.model)
    poser = tasks.poser_for(models.detect_family(models.load_config(cfg.model)), data, cfg.task, tok)
    frame = data.splits["validation"].head(200)
    rows = frame.to_dict("records")
    if task == "wmt16_en_ro_sample":
        ins = tok([poser.prompt(r) for r in rows])["input_ids"]
        outs = tok([r["label"] for r in rows])["input_ids"]
        expected = sum(len(i) > seq or len(o) > 10 for i, o in zip(ins, outs))
        assert not any(len(i) > seq for i in ins)
    elif model == "tiny-llama":
        budget = 12 - max(len(c) for c in poser.candidates)
        expected = sum(len(i) > budget for i in tok([poser.prompt(r) + tasks.ANSWER_CUE for r in rows])["input_ids"])
        assert expected == sum(f["prompt_len"] < len(p) for f, p in zip(
            poser.encode(frame), tok([poser.prompt(r) + tasks.ANSWER_CUE for r in rows])["input_ids"]))
    else:
        expected = sum(len(i) > 12 for i in tok([poser.prompt(r) for r in rows])["input_ids"])
    assert poser.truncated(frame) == expected > 0
