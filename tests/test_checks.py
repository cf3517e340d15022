"""Bad input: every case is refused with one line that names the key and the value (and what is accepted), before
any row or result file is written. The README's testing section counts these cases."""

import pandas as pd
import pytest

from lorafa import checks, results
from lorafa.checks import BadInput
from lorafa.job import run

from .conftest import CONF

SMALL = ("task.max_train_samples=16", "task.max_eval_samples=8", "train.max_steps=2")


@pytest.mark.bad_input("an unknown model, method, task or experiments option")
@pytest.mark.parametrize("override, says", [
    ("model=roberta-bass", "model=roberta-bass: no such option; choices are "),
    ("method=lora,lorafb", "method=lorafb: no such option; choices are "),
    ("task=glue_sst3", "task=glue_sst3: no such option; choices are "),
    ("experiments=nope", "experiments=nope: no such option; choices are "),
])
def test_unknown_options_list_the_choices(override, says):
    with pytest.raises(BadInput) as err:
        checks.check_choices(["train.lr=1", override], CONF)
    assert str(err.value).startswith(says)
    group = override.split("=")[0]
    assert ", ".join(checks.choices(group, CONF)) in str(err.value) and len(checks.choices(group, CONF)) > 2
    checks.check_choices(["model=tiny-roberta,tiny-t5", "method=lorafa", "task=glue_sst2", "+x=1"], CONF)  # fine


def _files(tmp_path, frame, name="d.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return ["task=text_cls", f"task.data_files.train={path}", f"task.data_files.validation={path}"]


GOOD = pd.DataFrame({"text": ["a fine film", "a dull film"] * 4, "label": ["pos", "neg"] * 4})

CASES = {
    "rank 0": (["method.rank=0"], "method.rank=0: expected an integer ≥ 1"),
    "rank negative": (["method.rank=-4"], "method.rank=-4: expected an integer ≥ 1"),
    "rank above the layer": (["method.rank=100000"], "method.rank=100000: larger than layer"),
    "alpha 0": (["method.alpha=0"], "method.alpha=0: expected a number > 0"),
    "alpha negative": (["method.alpha=-16"], "method.alpha=-16: expected a number > 0"),
    "dropout 1": (["method.dropout=1.0"], "method.dropout=1.0: expected a number in [0, 1)"),
    "dropout negative": (["method.dropout=-0.1"], "method.dropout=-0.1: expected a number in [0, 1)"),
    "batch size 0": (["train.batch_size=0"], "train.batch_size=0: expected an integer ≥ 1"),
    "grad accum 0": (["train.grad_accum=0"], "train.grad_accum=0: expected an integer ≥ 1"),
    "grad accum negative": (["train.grad_accum=-2"], "train.grad_accum=-2: expected an integer ≥ 1"),
    "seq len 0": (["task.max_seq_len=0"], "task.max_seq_len=0: expected an integer ≥ 1"),
    "epochs 0 without max_steps": (["train.max_steps=0", "train.epochs=0"],
                                   "train.epochs=0: expected an integer ≥ 1 (or train.max_steps > 0)"),
    "lr 0": (["train.lr=0"], "train.lr=0: expected a number > 0"),
    "B lr ratio 0": (["method.b_lr_ratio=0"], "method.b_lr_ratio=0: expected a number > 0"),
    "lr scale 0": (["protocol.lr_scale=0"], "protocol.lr_scale=0: expected a number > 0"),
    "holdout all of train": (["+task.holdout=64"], "task.holdout=64: expected a fraction in (0, 1) or a whole count"),
    "lr negative": (["train.lr=-1e-4"], "train.lr=-0.0001: expected a number > 0"),
    "targets match nothing": (["method.targets=[qkv_proj]"],
                              "method.targets=['qkv_proj'] matches no linear layer; the blocks' linear layers are"),
    "seq len beyond positions": (["task.max_seq_len=4096"],
                                 "task.max_seq_len=4096: larger than the model's 512 positions"),
    "model.path missing": (["model=local", "model.path=/nonexistent/ckpt"],
                           "model.path=/nonexistent/ckpt: no such directory"),
    "compile unknown": (["train.compile=fast"], "train.compile=fast: expected auto, none, blocks, graph or eager_graph"),
    "graph on CPU": (["train.compile=graph"], "train.compile=graph: not possible here: device cpu"),
    "bucket negative": (["train.bucket=-32"], "train.bucket=-32: expected auto or an integer ≥ 0"),
    "log_every 0": (["train.log_every=0"], "train.log_every=0: expected an integer ≥ 1"),
    "optimizer unknown": (["train.optimizer_impl=apex"], "train.optimizer_impl=apex: expected auto, fused or foreach"),
    "group_by_length not a bool": (["train.group_by_length=sometimes"],
                                   "train.group_by_length=sometimes: expected true or false"),
    "LoRA-FA layer unknown": (["method.stacked=twice"], "method.stacked=twice: expected auto, false, true or merged"),
    "checkpoint plan unknown": (["method.gradient_checkpointing=middle:2"],
                                "method.gradient_checkpointing=middle:2: expected true, false, every:K, first:N"),
    "checkpoint block missing": (["method.gradient_checkpointing=[0,5]"],
                                 "block 5 does not exist; the model has 2 blocks (0…1)"),
    "offload not a block set": (["method.offload=some"], "method.offload=some: expected true, false, every:K"),
    "offloaded linear outputs with compiled blocks": (["method.offload=true", "method.offload_ops=linear_outputs",
                                                       "train.compile=blocks"],
                                                      "train.compile=blocks: not with method.offload_ops=linear_outputs"),
    "offload ops unknown": (["method.offload_ops=norms"], "method.offload_ops=norms: expected all or linear_outputs"),
    "offload in flight not positive": (["method.offload_inflight_mib=0"], "method.offload_inflight_mib=0"),
    "plan unknown": (["train.plan=fastest"], "train.plan=fastest: expected one of none, elementwise"),
    "plan with a budget": (["train.plan=all", "train.memory_budget_gib=4"],
                           "train.plan=all: not with train.memory_budget_gib"),
    "memory budget not positive": (["train.memory_budget_gib=0"],
                                   "train.memory_budget_gib=0: expected a number > 0 (GiB) or null"),
    "plan trials negative": (["train.memory_budget_gib=4", "train.plan_trials=-1"],
                             "train.plan_trials=-1: expected an integer ≥ 0"),
    "plan trial seconds negative": (["train.memory_budget_gib=4", "train.plan_trial_s=-1"],
                                    "train.plan_trial_s=-1: expected a number ≥ 0"),
    "plan race seconds negative": (["train.memory_budget_gib=4", "train.plan_trial_max_s=-1"],
                                   "train.plan_trial_max_s=-1: expected a number ≥ 0"),
    "plan retime negative": (["train.memory_budget_gib=4", "train.plan_retime=-0.1"],
                             "train.plan_retime=-0.1: expected a number ≥ 0"),
    "plan interleave not a bool": (["train.memory_budget_gib=4", "train.plan_interleave=sometimes"],
                                   "train.plan_interleave=sometimes: expected true or false"),
    "device memory not positive": (["train.device_memory_gib=0"],
                                   "train.device_memory_gib=0: expected a number > 0 (GiB) or null"),
    "device memory cap off CUDA": (["device=cpu", "train.device_memory_gib=4"],
                                   "train.device_memory_gib=4: caps a CUDA device's memory, and the job runs on cpu"),
    "expandable segments unknown": (["train.expandable_segments=sometimes"],
                                    "train.expandable_segments=sometimes: expected auto, true or false"),
    "checkpoint policy unknown": (["method.checkpoint_policy=some"],
                                  "method.checkpoint_policy=some: expected one of full, matmuls, matmuls_attention"),
}


# the kind of bad input each case shows (docs/testing.md counts the kinds the suite's tests mark)
STEP_OPTION = "a step option out of its values"
BLOCK_SET = "a checkpoint or offload setting malformed or out of range"
KIND = {"rank 0": "method.rank out of range", "rank negative": "method.rank out of range",
        "rank above the layer": "method.rank out of range", "alpha 0": "method.alpha ≤ 0",
        "alpha negative": "method.alpha ≤ 0", "dropout 1": "method.dropout outside [0, 1)",
        "dropout negative": "method.dropout outside [0, 1)", "batch size 0": "train.batch_size ≤ 0",
        "grad accum 0": "train.grad_accum ≤ 0", "grad accum negative": "train.grad_accum ≤ 0",
        "seq len 0": "task.max_seq_len out of range", "seq len beyond positions": "task.max_seq_len out of range",
        "epochs 0 without max_steps": "train.epochs < 1 without train.max_steps", "lr 0": "a learning rate ≤ 0",
        "lr negative": "a learning rate ≤ 0", "B lr ratio 0": "a learning rate ≤ 0",
        "lr scale 0": "a learning rate ≤ 0", "holdout all of train": "task.holdout out of range",
        "targets match nothing": "target modules that match nothing",
        "model.path missing": "model.path missing or not a model directory",
        "compile unknown": STEP_OPTION, "graph on CPU": STEP_OPTION, "bucket negative": STEP_OPTION,
        "log_every 0": STEP_OPTION, "optimizer unknown": STEP_OPTION, "group_by_length not a bool": STEP_OPTION,
        "LoRA-FA layer unknown": STEP_OPTION, "checkpoint plan unknown": BLOCK_SET,
        "checkpoint block missing": BLOCK_SET, "offload not a block set": BLOCK_SET,
        "offload ops unknown": BLOCK_SET, "offload in flight not positive": BLOCK_SET,
        "checkpoint policy unknown": BLOCK_SET,
        "offloaded linear outputs with compiled blocks": "method.offload_ops=linear_outputs with compiled blocks",
        "plan unknown": "an unknown train.plan, or one with a budget",
        "plan with a budget": "an unknown train.plan, or one with a budget",
        "memory budget not positive": "a memory budget ≤ 0 or that no plan fits", "plan trials negative": STEP_OPTION,
        "plan trial seconds negative": STEP_OPTION, "plan race seconds negative": STEP_OPTION,
        "plan retime negative": STEP_OPTION,
        "plan interleave not a bool": STEP_OPTION, "expandable segments unknown": STEP_OPTION,
        "device memory not positive": "train.device_memory_gib ≤ 0, off CUDA or above the device's memory",
        "device memory cap off CUDA": "train.device_memory_gib ≤ 0, off CUDA or above the device's memory"}
assert set(KIND) == set(CASES), set(KIND) ^ set(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.bad_input(KIND[c]), id=c) for c in sorted(CASES)])
def test_bad_values_are_refused_in_one_line_with_no_row(cfg_factory, case):
    overrides, says = CASES[case]
    cfg = cfg_factory(*SMALL, *overrides)
    with pytest.raises(BadInput) as err:
        run(cfg)
    message = str(err.value)
    assert says in message and "\n" not in message
    assert not list(cfg_factory.root.rglob(results.ROW_FILE))  # no row, no partial file


@pytest.mark.bad_input("method.rank out of range")
def test_the_largest_rank_a_layer_allows_runs(cfg_factory):
    """The rank bound is the layer's: tiny-roberta's smallest side is 128 (its hidden size)."""
    assert run(cfg_factory(*SMALL, "method.rank=128"))["status"] == "ok"
    with pytest.raises(BadInput, match=r"method.rank=129: larger than layer .*128 × 128\); expected ≤ 128"):
        run(cfg_factory(*SMALL, "method.rank=129"))


@pytest.mark.bad_input("a data file missing, unreadable, empty or without the task's columns",
                       "labels outside the task's label set", "empty texts or labels", "training data of one class",
                       "model.path missing or not a model directory")
def test_bad_data_files_are_refused_in_one_line_with_no_row(cfg_factory, tmp_path):
    def refused(overrides, says):
        cfg = cfg_factory(*SMALL, *overrides)
        with pytest.raises(BadInput) as err:
            run(cfg)
        assert says in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert not list(cfg_factory.root.rglob(results.ROW_FILE))

    refused(["task=text_cls", f"task.data_files.train={tmp_path / 'no.csv'}",
             f"task.data_files.validation={tmp_path / 'no.csv'}"], "no.csv: no such file")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 torn")
    refused(["task=text_cls", f"task.data_files.train={tmp_path / 'broken.parquet'}",
             f"task.data_files.validation={tmp_path / 'broken.parquet'}"], "broken.parquet: cannot read it as .parquet")
    refused(_files(tmp_path, GOOD.iloc[:0], "empty.csv"), "empty.csv: the file has no rows")
    refused(_files(tmp_path, GOOD.rename(columns={"text": "review"}), "cols.csv"),
            "no column 'text' (or 'text'); columns are ['review', 'label']")
    # rows that mean nothing: refused when more than a few (a few are dropped: the next test)
    empty_labels = GOOD.assign(label=["pos", "neg", "", "neg", None, "neg", "pos", "neg"])
    refused(_files(tmp_path, empty_labels, "nolabel.csv"),
            "nolabel.csv: 2 of 8 rows have an empty text or label (first at lines [4, 6])")
    refused(_files(tmp_path, GOOD.assign(text=["  ", "a dull film"] * 4), "notext.csv"),
            "notext.csv: 4 of 8 rows have an empty text or label")
    refused(_files(tmp_path, GOOD.assign(text=[""] * 8), "alltext.csv"),
            "alltext.csv: every row has an empty text or label")
    refused(_files(tmp_path, GOOD.assign(label="pos"), "oneclass.csv"),
            "oneclass.csv: the training data has one label class (['pos']); expected at least 2")
    refused([*_files(tmp_path, GOOD, "labels.csv"), "task.labels=[neg,neutral]"],
            "labels ['pos'] are not in the task's label set ['neg', 'neutral']")
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "weights.bin").write_bytes(b"")
    refused(["model=local", f"model.path={tmp_path / 'notamodel'}"],
            "notamodel: not a model directory (no config.json; it holds ['weights.bin'])")


@pytest.mark.bad_input("empty texts or labels")
def test_a_few_empty_rows_are_dropped_with_a_warning_and_counted(cfg_factory, tmp_path, caplog):
    """One empty label and one empty text in 40 rows (5 %): dropped, a one-line warning, `dropped_rows` in the row
    (both splits read the same file here: 4 dropped); the empty label did not become a class."""
    frame = pd.concat([GOOD] * 5, ignore_index=True)
    frame.loc[3, "label"], frame.loc[10, "text"] = None, ""
    with caplog.at_level("WARNING"):
        row = run(cfg_factory(*SMALL, *_files(tmp_path, frame)))
    assert row["status"] == "ok" and row["dropped_rows"] == 4
    warned = [r.getMessage() for r in caplog.records if "dropped 2 of 40 rows" in r.getMessage()]
    assert warned and "first at lines [5, 12]" in warned[0] and "\n" not in warned[0]


@pytest.mark.bad_input("the hub out of reach")
def test_hub_unreachable_is_refused_with_the_local_path_hint(cfg_factory, offline):
    cfg = cfg_factory("model=roberta-base", "task=glue_sst2")
    with pytest.raises(BadInput) as err:
        run(cfg)
    message = str(err.value)
    assert "Hugging Face hub" in message and "model.path=" in message and "task.data_files.train=" in message
    assert "\n" not in message and not list(cfg_factory.root.rglob(results.ROW_FILE))


@pytest.mark.slow
def test_the_testing_page_counts_the_kinds_the_tests_mark(tmp_path):
    """docs/testing.md's "N kinds of bad input in M tests" and "K kinds of fault in J tests", every kind's name,
    and the README's two counts are what the suite's `bad_input` / `fault` markers say (collected by `tests/kinds.py`): the page cannot
    claim a kind no test shows, nor miss one a test adds."""
    import json
    import os
    import re
    import subprocess
    import sys

    from .conftest import ROOT

    out = tmp_path / "kinds.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "tests.kinds",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LORAFA_KINDS_OUT": str(out)}, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = json.loads(out.read_text())
    page = " ".join((ROOT / "docs" / "testing.md").read_text().split())
    for marker, words in (("bad_input", "bad input"), ("fault", "fault")):
        found = kinds[marker]
        tests = {t for nodes in found.values() for t in nodes}
        claim = re.search(rf"\*\*(\d+) kinds of {words} in (\d+) tests\*\*", page)
        assert claim, f"docs/testing.md: no '**N kinds of {words} in M tests**'"
        assert (int(claim.group(1)), int(claim.group(2))) == (len(found), len(tests)), (
            f"docs/testing.md says {claim.group(0)}; the markers say {len(found)} kinds in {len(tests)} tests")
        missing = [k for k in found if k not in page]
        assert not missing, f"docs/testing.md does not name these {words} kinds: {missing}"
        readme = re.search(rf"\*\*(\d+) kinds of {words}\*\*", " ".join((ROOT / "README.md").read_text().split()))
        assert readme and int(readme.group(1)) == len(found), f"README: '**N kinds of {words}**', N = {len(found)}"
    assert len(kinds["bad_input"]) >= 25 and len(kinds["fault"]) >= 12  # markers dropped would shrink both


def test_the_configuration_page_names_every_key_of_every_option():
    """docs/configuration.md names every option file of every config group and every key those options compose
    to (`group.key`, one level down), so the page cannot fall behind conf/."""
    from pathlib import Path

    from tests.conftest import CONF, ROOT, compose_cfg

    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = []
    for group in ("model", "method", "task", "protocol", "train"):
        for option in sorted((Path(CONF) / group).glob("*.yaml")):
            if f"`{option.stem}`" not in doc and group != "train":
                missing.append(f"{group}/{option.stem}")
            node = compose_cfg([f"{group}={option.stem}"]).get(group) or {}
            missing += [f"{group}.{k}" for k in node if f"`{group}.{k}`" not in doc and f"`{group}.{k}=" not in doc]
    missing += [k for k in ("experiment", "seed", "device", "output_dir") if f"`{k}`" not in doc]
    assert not missing, sorted(set(missing))
