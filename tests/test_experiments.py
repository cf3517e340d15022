"""Every experiment file composes, and every value it sweeps is an option that exists or a key that the config has.

The yaml files in experiments/ are the `experiments` config group (python run.py -m experiments=NAME); the Python
ones (memory.py) compose one config per job themselves. The settings tables (`hparams`, read by ${hparam:...})
must resolve for every model × task × method the sweep launches.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import lorafa
from tests.conftest import CONF, ROOT

EXPERIMENTS = ROOT / "experiments"
YAMLS = sorted(EXPERIMENTS.glob("*.yaml"))
GROUPS = {p.name for p in CONF.iterdir() if p.is_dir()} | {"experiments"}
COMPOSED_OPTIONS: set[tuple[str, str]] = set()


def options(group: str) -> set[str]:
    where = EXPERIMENTS if group == "experiments" else CONF / group
    return {p.stem for p in where.glob("*.yaml")}


def compose_experiment(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiments={name}", *overrides, "output_dir=/tmp/lorafa-test"],
                       return_hydra_config=True)


def resolved(cfg) -> dict:
    """The job's config with every interpolation resolved (the hydra node left out: it needs a running job)."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def sweep_params(cfg) -> dict[str, list[str]]:
    return {k: [v.strip() for v in str(vals).split(",")] for k, vals in cfg.hydra.sweeper.params.items()}


def test_the_experiments_are_there():
    """One file per table or figure of the paper, each with its run command in the first comment."""
    expected = {"glue_roberta", "glue_t5", "wmt16_t5", "llama_mmlu", "memory", "memory_vs_batch", "memory_vs_seq",
                "memory_vs_rank", "throughput", "loss_curves", "accuracy_vs_params", "lr_sensitivity", "distributed"}
    present = {p.stem for p in EXPERIMENTS.iterdir() if p.suffix in (".yaml", ".py")}
    assert expected <= present, expected - present
    for path in YAMLS:
        first = path.read_text().splitlines()[:2]
        assert first[0] == "# @package _global_", path.name
        assert re.match(rf"# (python|torchrun --nproc-per-node \d+) run\.py -m experiments={path.stem}\b",
                        first[1]), (path.name, first[1])


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_experiment_composes_and_sweeps_existing_options(path):
    cfg = compose_experiment(path.stem)
    assert cfg.experiment == path.stem  # every row says which table it belongs to
    params = sweep_params(cfg)
    assert params, f"{path.name} sweeps nothing"
    for key, values in params.items():
        if key in GROUPS:
            unknown = set(values) - options(key)
            assert not unknown, f"{path.name}: {key}={sorted(unknown)} do not exist; have {sorted(options(key))}"
        else:
            assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", f"{path.name}: no key {key}"
        for value in values:  # each value on its own, the others as the file sets them
            if key in GROUPS and (key, value) in COMPOSED_OPTIONS:
                continue  # an option already composed under an experiment file with the same settings machinery
            COMPOSED_OPTIONS.add((key, value))
            job = compose_experiment(path.stem, f"{key}={value}")
            assert resolved(job)["experiment"] == path.stem  # every interpolation resolves
            if key not in GROUPS:
                got = OmegaConf.select(job, key)
                assert got == type(got)(value) if isinstance(got, (int, float)) else str(got) == value, (key, got)
            elif key in ("model", "task"):
                assert job[key].get("alias" if key == "model" else "name") is not None


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_settings_resolve_for_every_job_of_the_sweep(path):
    """${hparam:...} looks up by model alias, task name and method name: every combination the sweep launches
    resolves (without composing each one: the lookup reads only those three names)."""
    cfg = compose_experiment(path.stem)
    params = sweep_params(cfg)
    names = {"model": ("model.alias", [compose_experiment(path.stem, f"model={m}").model.alias
                                       for m in params.get("model", [cfg.model.alias])]),
             "task": ("task.name", params.get("task", [cfg.task.name])),
             "method": ("method.name", params.get("method", [cfg.method.name]))}
    for combo in itertools.product(*(vals for _, vals in names.values())):
        job = OmegaConf.to_container(cfg, resolve=False)
        job = OmegaConf.create({k: v for k, v in job.items() if k != "hydra"})
        for (key, _), value in zip(names.values(), combo):
            OmegaConf.update(job, key, value)
        resolved = OmegaConf.to_container(job, resolve=True)
        assert resolved["train"]["lr"] > 0, (path.stem, combo)


def test_glue_roberta_uses_the_lora_paper_settings():
    """LoRA paper Table 9 for the adapters, RoBERTa paper Table 10 for full fine-tuning."""
    base = compose_experiment("glue_roberta", "model=roberta-base", "task=glue_cola", "method=lorafa")
    assert (base.train.lr, base.train.epochs, base.train.batch_size, base.task.max_seq_len) == (4e-4, 80, 16, 512)
    assert (base.method.rank, base.method.alpha, base.method.targets) == (8, 8, "qv")
    large = compose_experiment("glue_roberta", "model=roberta-large", "task=glue_sst2", "method=lora")
    assert (large.train.lr, large.train.epochs, large.train.batch_size, large.task.max_seq_len) == (4e-4, 10, 4, 128)
    assert large.method.alpha == 16
    full = compose_experiment("glue_roberta", "model=roberta-base", "task=glue_rte", "method=full")
    assert (full.train.lr, full.train.epochs, full.train.weight_decay) == (2e-5, 10, 0.1)
    # any other model / task: the method-level values, and the command line still wins
    other = compose_experiment("glue_roberta", "model=tiny-roberta", "task=movie_polarity", "method=lora",
                               "train.lr=1e-3")
    assert (other.train.lr, other.train.epochs, other.method.rank) == (1e-3, 3, 8)


def test_hparam_lookup_order_and_missing_key():
    root = OmegaConf.create({
        "method": {"name": "lora"}, "model": {"alias": "m"}, "task": {"name": "t"},
        "hparams": {"lora": {"lr": 1.0, "m": {"lr": 2.0, "t": {"lr": 3.0}, "epochs": 5}}},
        "a": "${hparam:lr}", "b": "${hparam:epochs}", "c": "${hparam:batch_size,7}", "d": "${hparam:nothing}"})
    assert (root.a, root.b, root.c) == (3.0, 5, 7)
    root.task.name = "other"
    assert root.a == 2.0
    root.model.alias = "other"
    assert root.a == 1.0
    with pytest.raises(Exception, match="hparams has no 'nothing'"):
        _ = root.d


def test_python_experiment_composes_every_job():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import memory as memory_experiment
    finally:
        sys.path.remove(str(EXPERIMENTS))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for model, variant in itertools.product(memory_experiment.SETTINGS, memory_experiment.VARIANTS):
            if model != "llama-7b" and variant != "lorafa":  # every variant once, every model once
                continue
            cfg = compose("config", overrides=[*memory_experiment.overrides_for(model, variant, "cpu", 5),
                                               "output_dir=/tmp/x"])
            assert cfg.experiment == "memory" and cfg.model.alias == model
            assert cfg.method.name == variant.split("+")[0]


def test_smoke_lines_run_their_own_experiment():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import smoke
    finally:
        sys.path.remove(str(EXPERIMENTS))
    files = smoke.experiment_files()
    assert {p.stem for p in files} >= {p.stem for p in YAMLS}
    for path in files:
        args = smoke.smoke_command(path)
        assert args is not None, f"{path.name} has no smoke line"
        if path.suffix == ".yaml":
            assert f"experiments={path.stem}" in args and "-m" in args
        argv = smoke.argv_for(path, Path("/tmp/out"))
        script = next(a for a in argv[1:] if a.endswith(".py"))
        assert argv[0] == sys.executable and Path(script).is_file()
        if args[0] == "torchrun":  # this Python's launcher, on a free port
            assert argv[1:4] == ["-m", "torch.distributed.run", "--standalone"]


def test_lorafa_root_points_at_the_checkout():
    assert Path(lorafa.sources.experiments_root()) == ROOT


def test_memory_budget_sweeps_every_plan_a_budget_considers_and_each_budget():
    """experiments/memory_budget.yaml: its variants are the planner's candidates (by name, for a model whose blocks
    allow every one of them, on a GPU) and the four budgets; each resolves to a named plan or a budget, not both."""
    from lorafa import plans

    cfg = compose_experiment("memory_budget")
    names = [p.name for p in plans.candidates(32, offload=True)]
    away = {"all_elementwise_weights16": "all_elementwise+weights16",  # and two with weights on the host
            "offload_every2_keep_weights16": "offload_every2_keep+weights16"}
    assert list(cfg.plans) == [*names, *away] and all(cfg.plans[n] == n for n in names)
    assert all(cfg.plans[v] == p and plans.named(p, 24).name == p for v, p in away.items())
    swept = str(cfg.hydra.sweeper.params["variant"]).split(",")
    assert swept == [*names, *away, "budget1", "budget2", "budget3", "budget4"]
    for model, budgets in (("llama-7b", [20, 24, 32, 40]), ("roberta-large", [1.75, 2.5, 3.25, 4.5])):
        for variant in swept:
            job = resolved(compose_experiment("memory_budget", f"model={model}", f"variant={variant}"))
            if variant.startswith("budget"):
                assert job["train"]["plan"] is None
                assert job["train"]["memory_budget_gib"] == budgets[int(variant[-1]) - 1]
            else:
                assert job["train"]["plan"] == away.get(variant, variant) and job["train"]["memory_budget_gib"] is None


def side_by_side_module():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import memory_budget_side_by_side
    finally:
        sys.path.remove(str(EXPERIMENTS))
    return memory_budget_side_by_side


def test_side_by_side_times_every_plan_the_sweep_ran_at_its_setting():
    """experiments/memory_budget_side_by_side.py on the committed sweep: per method, every plan a job of the model
    ran (hand-set, and each budget's choice in any pass) at the rows' batch, length, dropout and LoRA-FA layer;
    rows that disagree on the shape are bad input, as is a method the sweep did not run."""
    import pandas as pd

    from lorafa.checks import BadInput

    side = side_by_side_module()
    sweep = pd.read_parquet(ROOT / "results" / "memory_budget.parquet")
    for model, shape, dropout, fa_layer in (("roberta-large", (32, 128), 0.1, "two_matmul"),
                                            ("llama-7b", (8, 1024), 0.0, "merged")):
        got = {s["method"]: s for s in side.from_sweep(sweep, model)}
        assert sorted(got) == ["lora", "lorafa"]
        for method, s in got.items():
            ran = sweep[(sweep["model"] == model) & (sweep["method"] == method) & (sweep["status"] == "ok")]
            assert sorted(s["plans"]) == sorted(set(ran["plan_name"])) and len(s["plans"]) == len(set(s["plans"]))
            chosen = set(ran.loc[ran["budget_gib"].notna(), "plan_name"])
            assert chosen <= set(s["plans"]) and s["plans"][0] == "none"  # the experiment's order first
            assert (s["batch_size"], s["seq_len"], s["dropout"]) == (*shape, dropout)
        assert got["lorafa"]["layer"] == fa_layer and got["lora"]["layer"] == "two_matmul"
    assert "offload_every2+keep11" in side.from_sweep(sweep, "roberta-large", ["lorafa"])[0]["plans"]  # pass 2's
    bent = sweep.copy()
    bent.loc[bent.index[(bent["model"] == "roberta-large") & (bent["method"] == "lora")][0], "batch_size"] = 16
    with pytest.raises(BadInput, match=r"batch_size \[16, 32\]"):
        side.from_sweep(bent, "roberta-large")
    with pytest.raises(BadInput, match="no ok row of them"):
        side.from_sweep(sweep[sweep["method"] == "lora"], "roberta-large", ["lorafa"])
    # --plans: the experiment's own setting for the model (its default entry for one it does not name)
    (fa,) = side.from_plans(["none", "all"], "roberta-large", ["lorafa"])
    assert (fa["batch_size"], fa["seq_len"], fa["dropout"], fa["plans"]) == (32, 128, 0.1, ["none", "all"])
    assert [(s["method"], s["batch_size"], s["seq_len"]) for s in side.from_plans(["all"], "tiny-llama")] == [
        ("lora", 4, 64), ("lorafa", 4, 64)]


def test_side_by_side_times_each_model_as_its_yaml_says(capsys):
    """How plans are timed comes from `side_by_side` in memory_budget.yaml's setting for the model: roberta-large
    keeps every plan on the device and times many short rounds; a model without one (llama-7b: its plans do not
    fit on a device together) rebuilds each plan every round; the command line overrides either, key by key."""
    from omegaconf import OmegaConf

    side = side_by_side_module()
    yaml = OmegaConf.load(ROOT / "experiments" / "memory_budget.yaml").setting
    common = ["--plans", "none", "all", "--methods", "lorafa", "--run-id", "R", "--out", "/tmp/x.parquet", "--dry-run"]

    def line(*argv):
        assert side.main(list(argv)) == 0
        return capsys.readouterr().out.splitlines()[-1]

    rl = yaml["roberta-large"].side_by_side
    assert f"--rounds {rl.rounds} --steps {rl.steps} --warmup 5 --resident " in line("--model", "roberta-large", *common)
    assert rl.resident and rl.rounds >= 20 and "side_by_side" not in yaml["llama-7b"]
    assert "--rounds 3 --steps 15 --warmup 5 --device" in line("--model", "llama-7b", *common)
    assert f"--rounds 5 --steps {rl.steps} --warmup 5 --device" in line("--model", "roberta-large", "--no-resident",
                                                                         "--rounds", "5", *common)
    assert "--rounds 3 --steps 15 --warmup 2 --resident " in line("--model", "llama-7b", "--resident", "--warmup", "2",
                                                                   *common)


def test_side_by_side_runs_the_bench_once_per_method_under_one_run_id(tmp_path):
    """A tiny sweep's plans, timed for real on the CPU: one bench run per method, each with its own plans, one
    run_id, the sweep's adapter dropout in every command."""
    import pandas as pd

    side = side_by_side_module()
    base = {"experiment": "memory_budget", "model": "tiny-llama", "status": "ok", "batch_size": 2, "seq_len": 16,
            "dropout": 0.1}
    rows = [{**base, "method": "lora", "plan_name": p, "layer": "none"} for p in ("none", "all")] + \
           [{**base, "method": "lorafa", "plan_name": p, "layer": "two_matmul"} for p in ("all", "all+keep1")] + \
           [{**base, "method": "lorafa", "plan_name": "elementwise", "layer": "two_matmul", "status": "failed"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "sweep.parquet")
    out = tmp_path / "side.parquet"
    assert side.main(["--model", "tiny-llama", "--sweep", str(tmp_path / "sweep.parquet"), "--device", "cpu",
                      "--rounds", "1", "--steps", "1", "--warmup", "1", "--run-id", "R1", "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    assert {m: sorted(g["plan_name"]) for m, g in table.groupby("method")} == {
        "lora": ["all", "none"], "lorafa": ["all", "all+keep1"]}  # a failed job's plan is not timed
    assert (table["status"] == "ok").all() and set(table["run_id"]) == {"R1"}
    assert set(table["experiment"]) == {"bench_plans"} and set(zip(table["batch_size"], table["seq_len"])) == {(2, 16)}
    assert table["command"].str.contains("--override method.dropout=0.1 ", regex=False).all()
