"""`python -m lorafa.bench`: the interleaved throughput benchmark. CPU smoke here; the numbers
come from a GPU (results/throughput.parquet)."""

import math
import re

import pandas as pd
import pytest

from lorafa import bench

COLUMNS = ["model", "method", "batch_size", "seq_len", "compiled", "tokens_per_s", "step_time_s", "mem_peak_gib",
           "device"]


def test_summarise_marks_each_methods_fastest_mode_and_the_ratios():
    rows = [{"model": "m", "batch_size": 2, "seq_len": 8, "method": meth, "compile_mode": mode, "status": "ok",
             "tokens_per_s": tps} for meth, mode, tps in [("full", "eager", 100.0), ("full", "compile", 120.0),
                                                          ("lora", "eager", 110.0), ("lora", "compile", 90.0),
                                                          ("lorafa", "eager", 150.0), ("lorafa", "compile", 180.0)]]
    table = bench.summarise(pd.DataFrame(rows))
    best = table[table["best"]].set_index("method")
    assert list(best["compile_mode"]) == ["compile", "eager", "compile"]
    assert best.loc["lorafa", "vs_full_best"] == pytest.approx(1.5)
    assert best.loc["lorafa", "vs_lora_best"] == pytest.approx(180 / 110)


def test_lorafa_layer_variants():
    assert bench.layer_variants("full") == bench.layer_variants("lora") == ["none"]  # no LoRA-FA layer
    assert bench.layer_variants("lorafa") == bench.layer_variants("lorafa_v2") == ["stacked", "two_matmul", "merged"]
    assert bench.layer_variants("lorafa", ["merged"]) == ["merged"]
    assert bench.layer_variants("lorafa", ["two_matmul", "stacked"]) == ["stacked", "two_matmul"]


def test_device_seconds_counts_kernels_once():
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    def ev(dev, name, us, note=False):
        return E(device_type=dev, name=name, is_user_annotation=note, self_device_time_total=us)

    events = [ev(DeviceType.CPU, "aten::mm", 700.0),
              ev(DeviceType.CUDA, "nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_bias_TNT", 500.0),  # its kernel
              ev(DeviceType.CUDA, "triton_poi_fused_add_gelu_3", 200.0),
              ev(DeviceType.CUDA, "## Call CompiledFxGraph fxyz ##", 700.0, note=True)]
    assert bench.device_seconds(events) == pytest.approx(700e-6)
    kinds = bench.device_seconds_by_kind(events)
    assert kinds["matmul"] == pytest.approx(500e-6) and kinds["inductor"] == pytest.approx(200e-6)
    assert sum(kinds.values()) == pytest.approx(700e-6) and set(kinds) == set(bench.KERNEL_KINDS)


@pytest.mark.parametrize("name, kind", [  # kernel names from H200 profiles (torch 2.11, CUDA 13)
    ("sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize64x64x8_stage3_warpsize1x2x1_ffma_aligna4_alignc4_execute_kernel",
     "matmul_fp32"),
    ("nvjet_sm90_tst_96x64_64x8_2x4_h_bz_NTN", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(...)", "matmul"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<...>)", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, true>(...)", "attention"),
    ("void (anonymous namespace)::softmax_warp_backward<float, float, float, 7, false, false>(...)", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>(...)",
     "optimizer"),
    ("triton_red_fused__to_copy_native_layer_norm_backward_12", "inductor"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(...)", "other"),
])
def test_kernel_kinds(name, kind):
    assert bench.kernel_kind(name) == kind


@pytest.mark.slow
def test_bench_runs_every_method_interleaved_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "throughput.parquet"
    assert bench.main(["--models", "tiny-llama", "--device", "cpu", "--warmup", "1", "--steps", "2", "--rounds", "2",
                       "--profile", str(tmp_path / "prof"), "--out", str(out), "--run-id", "20261129T0200"]) == 0
    profiles = sorted(p.name for p in (tmp_path / "prof").iterdir())
    names = ["full", "lora", *(f"{m}{x}" for m in ("lorafa", "lorafa_v2") for x in ("", "_stacked", "_merged"))]
    assert profiles == sorted(f"tiny-llama_4x32_{m}_eager.txt" for m in names)  # first round only
    assert "aten::" in (tmp_path / "prof" / "tiny-llama_4x32_lorafa_stacked_eager.txt").read_text()
    table = pd.read_parquet(out)
    assert set(COLUMNS) <= set(table.columns)
    assert sorted(table["method"]) == sorted([*bench.METHODS, *["lorafa", "lorafa_v2"] * 2]) \
        and (table["status"] == "ok").all()
    assert (table["rounds"] == 2).all() and table["best"].sum() == 4 and (table["compile_mode"] == "eager").all()
    assert (table["tokens_per_s"] > 0).all() and (table["step_flops"] > 0).all() and (table["warmup_s"] > 0).all()
    assert (table["compiled_graphs"] == 0).all() and (table["compile_scope"] == "none").all()  # eager
    assert (table["optimizer_steps"] == 3).all() and table["final_loss"].notna().all()
    assert table["config_hash"].is_unique and (table["run_id"] == "20261129T0200").all() and (table["schema_version"] > 0).all()
    flops = table.groupby("method")["step_flops"].max()
    assert flops["lorafa"] < flops["lora"] < flops["full"]  # LoRA-FA: no weight-gradient matmuls at all
    layers = {"stacked", "two_matmul", "merged"}
    assert table.groupby("method")["layer"].apply(set).to_dict() == {"full": {"none"}, "lora": {"none"},
                                                                     "lorafa": layers, "lorafa_v2": layers}
    assert (table["stacked"] == table["layer"].isin(["stacked", "merged"])).all()
    loss = table[table["method"] == "lorafa"].set_index("layer")["final_loss"]  # three layers, one model (fp32)
    assert loss["merged"] == pytest.approx(loss["two_matmul"], rel=1e-4) == loss["stacked"]
    assert table.groupby("method")["best"].sum().eq(1).all()  # each method's fastest setting, one each
    printed = capsys.readouterr().out
    assert "LoRA-FA" in printed and "÷ full FT" in printed
    from analysis.__main__ import main as analysis  # the speed notebook on these rows
    from lorafa import report

    try:
        assert analysis(["--results", str(out), "--out", str(tmp_path / "an"), "--only", "speed"]) == 0
    finally:
        report.set_params()
    speed = (tmp_path / "an" / "speed.md").read_text()
    assert speed.count("| tiny-llama ") == 4 and "python -m lorafa.bench --models tiny-llama" in speed
    assert (tmp_path / "an" / "speed_settings.md").exists() and (tmp_path / "an" / "speed.png").exists()
    assert (tmp_path / "an" / "speed_kernels.md").read_text().count("| tiny-llama ") == 4  # CPU: "—"
    # a profiled run's breakdown reaches the table (CPU has no kernel times: set some to see them rendered)
    table.loc[table["best"], "kernel_matmul_fp32_ms"] = 12.34
    table.to_parquet(tmp_path / "profiled.parquet")
    try:
        assert analysis(["--results", str(tmp_path / "profiled.parquet"), "--out", str(tmp_path / "an2"),
                         "--only", "speed"]) == 0
    finally:
        report.set_params()
    kernels = (tmp_path / "an2" / "speed_kernels.md").read_text()  # the cells that are 12.34 (not 112.34 ms a step)
    assert len(re.findall(r"\|\s*12\.34\s*(?=\|)", kernels)) == 4, kernels
    assert "development runs" not in (tmp_path / "an2" / "speed.md").read_text()
    # development rows (`dev_run`) are shown only while there is no benchmark run, and then say so
    dev = table.assign(dev_run="a development run", run_id="99999999T999999", step_time_s=0.12345)
    for files, shown in (([dev], "development runs only"), ([dev, table], None)):
        for i, f in enumerate(files):
            f.to_parquet(tmp_path / f"mix{i}.parquet")
        try:
            assert analysis(["--results", str(tmp_path / "mix*.parquet"), "--out", str(tmp_path / "an3"),
                             "--only", "speed"]) == 0
        finally:
            report.set_params()
        text = (tmp_path / "an3" / "speed.md").read_text()
        assert ("development runs only" in text) == bool(shown) and text.count("| tiny-llama ") == 4
        assert ("123.45" in text) == bool(shown)  # the development rows' step time
        (tmp_path / "mix1.parquet").unlink(missing_ok=True)


def test_memory_plans_are_settings_of_their_own(tmp_path):
    """`--plans`: each named plan (`train.plan`'s names, `+keepK` too) is a setting, interleaved with the others,
    applied as a job applies it: its checkpointed blocks and recomputation in the row, the same loss as the
    plain step. A plan with element-wise recomputation runs with its FLOPs uncounted (NaN): torch's FLOP counter
    and its backward's own autograd.grad do not go together."""
    out = tmp_path / "plans.parquet"
    assert bench.main(["--models", "tiny-llama", "--device", "cpu", "--methods", "lorafa", "--layers", "two_matmul",
                       "--warmup", "1", "--steps", "2", "--rounds", "2", "--plans", "none", "all", "elementwise",
                       "all+keep1", "--out", str(out)]) == 0
    table = pd.read_parquet(out).set_index("plan_name")
    assert sorted(table.index) == ["all", "all+keep1", "elementwise", "none"] and (table["status"] == "ok").all()
    assert table["checkpointed_blocks"].to_dict() == {"none": 0, "all": 2, "elementwise": 0, "all+keep1": 1}
    assert table.loc["none", "plan"] == "none" and "recompute elementwise" in table.loc["elementwise", "plan"]
    assert (table["rounds"] == 2).all() and table["config_hash"].is_unique and (table["host_offload_gib"] == 0).all()
    assert (table["experiment"] == "bench_plans").all()  # not rows of the methods' benchmark (analysis/speed.py)
    assert table["final_loss"].to_numpy() == pytest.approx(table.loc["none", "final_loss"], rel=1e-5)
    assert math.isnan(table.loc["elementwise", "step_flops"]) and (table.drop("elementwise")["step_flops"] > 0).all()


def test_resident_settings_are_built_once_and_timed_every_round(tmp_path, monkeypatch):
    """`--resident`: each plan is built, warmed up and measured in the first round and kept; later rounds only time
    its steps (short rounds, many of them, for ratios paired by round). The rows are those of rebuilt settings —
    the same losses, one step time per round — and say `resident`; a setting that failed when built is not built
    again; compiled modes are refused."""
    built = []
    real = bench.Setting.__init__

    def counting(self, cfg, *a, **k):
        built.append(str(cfg.train.plan))
        real(self, cfg, *a, **k)

    monkeypatch.setattr(bench.Setting, "__init__", counting)
    out = tmp_path / "resident.parquet"
    base = ["--models", "tiny-llama", "--device", "cpu", "--methods", "lorafa", "--layers", "two_matmul",
            "--warmup", "1", "--steps", "1", "--out", str(out)]
    argv = [*base, "--rounds", "4", "--plans", "none", "all", "offload_nowhere"]
    assert bench.main([*argv, "--resident"]) == 0
    assert sorted(built) == ["all", "none", "offload_nowhere"]  # the bad plan fails once, is not built again
    table = pd.read_parquet(out).set_index("plan_name")
    ok = table.loc[["none", "all"]]
    assert (ok["status"] == "ok").all() and (ok["rounds"] == 4).all() and table["resident"].all()
    assert ok["step_time_all_s"].map(len).tolist() == [4, 4] and (ok["tokens_per_s"] > 0).all()
    assert table.loc["offload_nowhere", "status"] == "failed"
    assert ok.loc["all", "checkpointed_blocks"] == 2 and ok.loc["all", "optimizer_steps"] == 2  # the first round's
    built.clear()
    assert bench.main([*base, "--rounds", "2", "--plans", "none", "all"]) == 0
    assert sorted(built) == ["all", "all", "none", "none"]  # without it: built again every round
    again = pd.read_parquet(out)
    assert again["config_hash"].is_unique and set(again["resident"]) == {True, False}
    with pytest.raises(SystemExit):
        bench.main([*argv, "--resident", "--modes", "compile"])


def test_a_kept_setting_whose_step_fails_is_dropped_with_the_rounds_it_finished(monkeypatch):
    """`--resident`: kept settings share the device, so one may stop fitting; it is dropped (freed, not timed
    again), its row keeps the rounds it finished and says in which round it failed; the others run on."""
    real, calls = bench.time_steps, {"n": 0}

    def flaky(s, steps):
        if str(s.plan) != "none":
            calls["n"] += 1
            if calls["n"] == 3:  # `all`'s third timing: round 3
                raise RuntimeError("CUDA out of memory (simulated)")
        return real(s, steps)

    monkeypatch.setattr(bench, "time_steps", flaky)
    rows = bench.bench_model("tiny-llama", ["lorafa"], ["eager"], shape=(2, 16), device=bench.torch.device("cpu"),
                             warmup=1, steps=1, rounds=4, layers=["two_matmul"], plans=["none", "all"], resident=True)
    by = {r["plan_name"]: r for r in rows}
    assert by["none"]["rounds"] == 4 and by["none"]["error"] == ""
    assert by["all"]["rounds"] == 2 and by["all"]["status"] == "ok" and calls["n"] == 3
    assert by["all"]["error"] == "round 3: RuntimeError: CUDA out of memory (simulated)"


def test_a_failing_setting_is_a_row_and_the_others_still_run(monkeypatch, capsys):
    real = bench.run_setting

    def flaky(cfg, mode, *a, **k):
        if cfg.method.name == "lora":
            raise RuntimeError("capture invalidated")
        return real(cfg, mode, *a, **k)

    monkeypatch.setattr(bench, "run_setting", flaky)
    rows = bench.bench_model("tiny-llama", ["lora", "lorafa"], ["eager"], shape=(2, 16), device=bench.torch.device("cpu"),
                             warmup=1, steps=1, rounds=1)
    by = {r["method"]: r for r in rows}
    assert by["lora"]["status"] == "failed" and by["lora"]["error"] == "RuntimeError: capture invalidated"
    assert by["lorafa"]["status"] == "ok" and by["lorafa"]["tokens_per_s"] > 0
    assert "capture invalidated" in capsys.readouterr().err  # the traceback, for finding the cause


def test_a_rows_memory_is_the_most_any_round_saw_and_nan_off_cuda(monkeypatch):
    """Rounds run in alternating order, so what a setting sees can differ by round: the row keeps the largest
    `mem_peak_gib` and `mem_held_gib` over its rounds, whichever round it came in; off CUDA both stay NaN."""
    seen = {"lora": iter([(2.0, 0.1), (3.0, 0.0), (1.0, 0.2)]), "lorafa": iter([(5.0, 0.0), (4.0, 0.3), (4.5, 0.0)]),
            "full": iter([(float("nan"), float("nan"))] * 3)}

    def fake(cfg, mode, *a, **k):
        peak, held = next(seen[cfg.method.name])
        return {"step_time_s": 0.01, "tokens": 32, "mem_peak_gib": peak, "mem_held_gib": held, "flops": 1.0,
                "mem_reserved_gib": peak + 1,
                "warmup_s": 0.1, "final_loss": 1.0}

    monkeypatch.setattr(bench, "run_setting", fake)
    rows = bench.bench_model("tiny-llama", ["lora", "lorafa", "full"], ["eager"], shape=(2, 16),
                             device=bench.torch.device("cpu"), warmup=1, steps=1, rounds=3, layers=["two_matmul"])
    by = {r["method"]: r for r in rows}
    assert (by["lora"]["mem_peak_gib"], by["lora"]["mem_held_gib"], by["lora"]["mem_reserved_gib"]) == (3.0, 0.2, 4.0)
    assert (by["lorafa"]["mem_peak_gib"], by["lorafa"]["mem_held_gib"]) == (5.0, 0.3)
    assert math.isnan(by["full"]["mem_peak_gib"]) and math.isnan(by["full"]["mem_held_gib"])
    assert all(r["rounds"] == 3 for r in rows)


def test_inside_a_capture_transformers_takes_the_path_it_takes_outside(monkeypatch):
    """While a CUDA stream is captured, transformers 5.17 builds a full attention mask where none was given (SDPA
    then runs its fp32 math kernel); the bench's capture hides the capture from it, so the captured step takes the
    warm-up's (and every other mode's) path: no mask. Simulated on CPU by a stream that says it is capturing."""
    import torch
    from transformers import RobertaConfig
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.utils.import_utils import is_tracing

    config = RobertaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64)
    config._attn_implementation = "sdpa"
    embeds = torch.zeros(2, 8, 32)
    assert create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=None) is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    capturing = torch.cuda.is_current_stream_capturing
    assert is_tracing()  # transformers sees the capture through this function
    with bench.unseen_capture():
        assert not is_tracing()
        assert create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=None) is None
    assert torch.cuda.is_current_stream_capturing is capturing


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padded"])
@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-t5", "tiny-llama"])
def test_a_captured_step_reads_no_tensor_value_on_the_host_and_runs_as_eager(monkeypatch, model, padded):
    """A CUDA graph capture fails at the first host read of a device tensor's value (`.item()`, `bool(t)`):
    llama-7b's graphed step did, in transformers' packed-sequence check of the position ids. A training step
    (forward and backward, the bench's and a job's) under a simulated capture, seen through `unseen_capture`, reads
    none — counted at the one operator every such read goes through, `aten._local_scalar_dense` — with or without
    a padding mask. And it takes eager's path: every transformer block gets the inputs (masks included: None or
    shape, dtype, strides) it gets in an eager step, so blocks compiled in the warm-up steps need no recompile
    inside the capture (T5's decoder, handed a causal mask only under a visible capture, did), and the loss is
    eager's."""
    import torch

    from lorafa import distributed, methods, models

    from .conftest import HostReads

    no_dropout = {"tiny-roberta": ["model.arch.hidden_dropout_prob=0", "model.arch.attention_probs_dropout_prob=0"],
                  "tiny-t5": ["model.arch.dropout_rate=0"], "tiny-llama": []}  # the steps compared draw no masks
    cfg = bench.compose(model, "lorafa", 2, 8, ["device=cpu", *no_dropout[model]], layer="merged")
    net = models.build(cfg.model, num_labels=2, device="cpu", dtype=torch.float32)
    methods.apply(net, cfg.method, cfg.model.get("target_modules"))
    batch = bench._batch(net.family, 2, 8, 8, net.model.config.vocab_size, torch.device("cpu"))
    if padded:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["attention_mask"][0, 5:] = 0
    inputs = []

    def describe(value):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype, value.stride()
        if isinstance(value, (tuple, list)):
            return tuple(describe(v) for v in value)
        return value if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__

    def record(module, args, kwargs):
        inputs.append([describe(v) for v in args] + [(k, describe(v)) for k, v in sorted(kwargs.items())])

    for block in distributed.transformer_blocks(net.model):
        block.register_forward_pre_hook(record, with_kwargs=True)

    def one_step():
        inputs.clear()
        loss = net.model.train()(**batch).loss
        loss.backward()
        return loss.detach(), list(inputs)

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with HostReads() as mode:  # an eager step reads: the check that can fail this test
        eager_loss, eager_inputs = one_step()
    assert bool(mode.reads) == (padded or model == "tiny-llama")  # the mask's skip check; decoders' packed check
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with bench.unseen_capture(), HostReads() as mode:
        captured_loss, captured_inputs = one_step()
    assert mode.reads == [], mode.reads[0]
    assert captured_inputs == eager_inputs and len(eager_inputs) >= 2
    assert float(captured_loss) == pytest.approx(float(eager_loss), rel=1e-6)


@pytest.mark.slow
def test_sigterm_writes_the_rounds_finished(tmp_path):
    """`timeout` (SIGTERM) in the middle of a run: the bench stops, writes every setting with the rounds it finished
    (the setting cut off keeps its earlier rounds) and exits 3; nothing measured is lost."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "t.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "lorafa.bench", "--models", "tiny-llama", "--device", "cpu",
                             "--methods", "full", "lora", "--rounds", "1000", "--steps", "1", "--warmup", "1",
                             "--peak-tflops", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip().startswith("round 3 "):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    assert "stopped by SIGTERM in round 3 of 1000" in err
    table = pd.read_parquet(out)
    assert sorted(table["method"]) == ["full", "lora"] and (table["status"] == "ok").all()
    assert set(table["rounds"]) <= {2, 3} and (table["rounds"] >= 2).all() and (table["tokens_per_s"] > 0).all()
    assert table["stopped"].str.startswith("stopped by SIGTERM").all()


def test_an_offloading_plan_is_refused_in_a_graph_mode_before_anything_is_built(monkeypatch):
    """A plan that offloads decides per saved tensor on the host and copies on a side stream: nothing a CUDA graph
    can capture, and a failed capture aborted the process on the GPU. A graph mode refuses it when the setting is
    made, before the model's method is applied. (CPU has no offloading plans: the device's check is lifted.)"""
    import torch

    from lorafa import methods, plans

    real = plans.named
    monkeypatch.setattr(plans, "named", lambda name, n, offload=True: real(name, n, offload=True))
    applied = []
    monkeypatch.setattr(methods, "apply", lambda *a, **k: applied.append(1) or (_ for _ in ()).throw(
        AssertionError("the method was applied")))
    cfg = bench.compose("tiny-llama", "lorafa", 2, 8, ["device=cpu", "train.plan=offload_all"], layer="two_matmul")
    for mode in ("graph", "compile_graph"):
        with pytest.raises(ValueError, match="plan offload_all in mode .*graph: offloading is not captured"):
            bench.Setting(cfg, mode, torch.device("cpu"))
    assert not applied
    with pytest.raises(AssertionError, match="the method was applied"):  # eager takes it
        bench.Setting(cfg, "eager", torch.device("cpu"))
