"""`lorafa.step` on CPU: which way a job steps, length buckets, the device-side accumulators and the sync-free loop.
(That a graphed step trains like an eager one is the CUDA tier's: tests/test_gpu.py.)"""

import json
import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from lorafa import step
from lorafa.checks import BadInput
from lorafa.job import run
from lorafa.tasks import collate
from tests.conftest import undocumented

CUDA = torch.device("cuda")  # a device object only: nothing here touches a GPU
CPU = torch.device("cpu")
SMALL = ("task.max_train_samples=64", "task.max_eval_samples=32", "train.batch_size=8")


def test_length_buckets():
    assert [step.bucket_length(n, 32, 128) for n in (1, 31, 32, 33, 100, 127, 128)] == [32, 32, 32, 64, 128, 128, 128]
    assert step.bucket_length(70, 64, 100) == 100  # never past the task's length
    assert [step.bucket_length(n, 0, 128) for n in (1, 77)] == [1, 77]  # 0: each batch its longest
    # auto: at most 8 shapes when compiled or graphed, a multiple of 32; 0 in eager mode
    cfg = {"bucket": "auto"}
    assert [step.bucket_multiple(cfg, n, "graph") for n in (64, 128, 512, 1024, 2048)] == [32, 32, 64, 128, 256]
    assert step.bucket_multiple(cfg, 128, "eager_graph") == 32 and step.bucket_multiple(cfg, 128, "none") == 0
    assert step.bucket_multiple({"bucket": 16}, 128, "none") == 16


def test_collate_pads_inputs_and_unaligned_labels_to_their_buckets():
    feats = [{"input_ids": [5, 6, 7], "labels": [1, 2]}, {"input_ids": [5], "labels": [3, 4, 5]}]
    b = collate(feats, pad_id=0, pad_to=8, pad_labels_to=4)
    assert b["input_ids"].shape == (2, 8) and b["labels"].shape == (2, 4)
    assert b["attention_mask"].sum().item() == 4 and b["input_ids"][1, 1:].eq(0).all()
    assert b["labels"][0].tolist() == [1, 2, -100, -100]
    aligned = collate([{"input_ids": [5, 6], "labels": [5, 6]}], pad_id=0, pad_to=4, aligned_labels=True)
    assert aligned["labels"].tolist() == [[5, 6, -100, -100]]


def test_length_grouped_epochs_batch_similar_lengths_in_random_order():
    """`train.group_by_length`: every example once an epoch; micro-batches of similar length (far less padding than
    random batches); the partial micro-batch last; the batches' order random (not longest first), reproducible from
    the generator; without grouping, the plain permutation."""
    from lorafa.train import GROUP_MEGABATCH, epoch_order

    lengths = torch.randint(4, 120, (1000,), generator=torch.Generator().manual_seed(1)).tolist()

    def pad(order, size):
        batches = [order[i: i + size] for i in range(0, len(order), size)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches), batches

    plain = epoch_order(lengths, 16, torch.Generator().manual_seed(0), group=False)
    assert plain == torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    grouped = epoch_order(lengths, 16, torch.Generator().manual_seed(0), group=True)
    assert sorted(grouped) == list(range(1000))
    assert grouped == epoch_order(lengths, 16, torch.Generator().manual_seed(0), group=True)
    waste, batches = pad(grouped, 16)
    assert waste < 0.1 * pad(plain, 16)[0]
    assert len(batches[-1]) == 1000 % 16 and all(len(b) == 16 for b in batches[:-1])
    longest = [max(lengths[j] for j in b) for b in batches[:-1]]
    falling = sum(a >= b for a, b in pairwise(longest)) / (len(longest) - 1)
    assert falling < 0.8, falling  # shuffled: not longest first within each run (that order gives ≥ 0.98 here)
    assert GROUP_MEGABATCH * 16 < 1000  # several runs sorted separately: the test sees the cut
    assert epoch_order(lengths, 1, torch.Generator().manual_seed(0), group=True) == plain


def test_a_length_grouped_job_pads_less(cfg_factory):
    common = ["task.max_train_samples=256", "task.max_eval_samples=32", "train.batch_size=8", "train.max_steps=20",
              "task.max_seq_len=128"]
    rows = {g: run(cfg_factory(*common, f"train.group_by_length={g}")) for g in ("false", "true")}
    assert rows["true"]["status"] == "ok" and rows["true"]["group_by_length"] is True, rows["true"]["error"]
    assert rows["false"]["group_by_length"] is False
    assert rows["true"]["pad_frac"] < 0.5 * rows["false"]["pad_frac"], (rows["true"]["pad_frac"],
                                                                          rows["false"]["pad_frac"])


def _cfg(cfg_factory, *overrides):
    return cfg_factory(*overrides)


@pytest.mark.bad_input("a step option out of its values")
def test_auto_is_a_graph_only_where_it_is_exact(cfg_factory):
    plain = cfg_factory()
    assert step.resolve_mode(plain, CPU, 10_000)[0] == "none"
    assert step.resolve_mode(plain, CUDA, 100)[0] == "eager_graph"  # short: compiling would not pay
    assert step.resolve_mode(plain, CUDA, step.COMPILE_MIN_STEPS)[0] == "graph"
    blocked = {"train.grad_accum=2": "train.grad_accum=2", "method.gradient_checkpointing=true": "checkpointing",
               "method.recompute=elementwise": "method.recompute=elementwise",
               "method.dropout=0.1": "method.dropout=0.1 with A frozen"}
    for override, why in blocked.items():
        mode, reason = step.resolve_mode(cfg_factory(override), CUDA, 10_000)
        assert mode == "none" and why in reason, (override, reason)
        with pytest.raises(BadInput, match=r"^train.compile=graph: not possible here: .*" + why.split()[0]):
            step.resolve_mode(cfg_factory(override, "train.compile=graph"), CUDA, 10_000)
    # LoRA's dropout is nn.Dropout (graph-safe RNG): not a blocker
    assert step.resolve_mode(cfg_factory("method=lora", "method.dropout=0.1"), CUDA, 10)[0] == "eager_graph"
    assert step.resolve_mode(cfg_factory("train.compile=blocks"), CPU, 10) == ("blocks", "blocks")


def test_the_lorafa_layer_rule():
    fa = {"train_a": False, "rank": 8, "dropout": 0.0}
    assert step.choose_layer(fa, CUDA, tokens_per_batch=32 * 128, hidden=768) == "merged"  # roberta-base 32×128
    assert step.choose_layer(fa, CUDA, tokens_per_batch=4 * 512, hidden=4096) == "true"  # llama-7b 4×512: stacked
    assert step.choose_layer({**fa, "dropout": 0.1}, CUDA, 4096, 768) == "false"  # stacked layers take no dropout
    assert step.choose_layer(fa, CPU, 4096, 768) == "false"  # not measured off CUDA: as before
    assert step.choose_layer({**fa, "train_a": True}, CUDA, 4096, 768) == "false"  # LoRA has no LoRA-FA layer


def test_accumulators_keep_losses_and_the_first_non_finite_step_on_the_device():
    acc = step.Accumulators(6, CPU)
    for loss, norm in [(1.0, 0.5), (0.9, float("inf")), (float("nan"), 1.0), (0.7, 0.1)]:
        flag = acc.record(torch.tensor(loss), torch.tensor(norm))
        assert flag.item() == float(not (math.isfinite(loss) and math.isfinite(norm)))
    losses, norms, first = acc.read(4)
    assert losses[0] == 1.0 and math.isnan(losses[2]) and norms[1] == math.inf and first == 1
    assert acc.read(4) == ([], [], 1) and acc.reads == 2  # nothing new; the first bad step stays the first
    assert step.diverged(0.9, math.inf, 1).args[0] == "gradient norm is inf at step 1 (loss 0.9)"
    assert step.diverged(math.nan, 1.0, 2).args[0] == "training loss is nan at step 2"


def test_a_fused_job_reads_the_device_every_log_every_steps_and_trains_the_same(cfg_factory):
    """The sync-free loop (fused AdamW: what a CUDA job runs, here on CPU): losses are read back every
    `train.log_every` steps, not every step, and the history is the one read step by step."""
    common = [*SMALL, "train.max_steps=14", "train.optimizer_impl=fused"]
    every = run(cfg_factory(*common, "train.log_every=1"))
    sparse = run(cfg_factory(*common, "train.log_every=5"))
    assert every["status"] == sparse["status"] == "ok" and sparse["optimizer_impl"] == "fused"
    assert list(sparse["loss_curve"]) == list(every["loss_curve"]) and len(sparse["loss_curve"]) == 14
    assert sparse["score"] == every["score"]
    # reads: 2 measured steps, the end of the warm-up (3), steps 5 and 10, the end of the epoch (8), the end (14),
    # and once more before the last evaluation
    assert sparse["log_reads"] <= 9 < every["log_reads"]
    foreach = run(cfg_factory(*SMALL, "train.max_steps=14"))  # CPU's default: read and checked every step
    assert foreach["optimizer_impl"] == "foreach" and foreach["log_reads"] >= 14
    np.testing.assert_allclose(foreach["loss_curve"], every["loss_curve"], rtol=1e-4)


def test_a_non_finite_step_is_skipped_on_the_device_and_stops_the_job_at_the_next_read(cfg_factory, monkeypatch):
    """With fused AdamW the divergence check never stops the device: a NaN at step 7 takes no update (the weights
    stay those of step 6) and the read after it raises, naming step 7, not the step of the read."""
    real = step.TrainStep.finish
    kept = {}

    def poisoned(self, loss, at):
        if at == 7:
            kept["b"] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            loss = loss * float("nan")
        real(self, loss, at)
        if at == 7:
            kept["after"] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    monkeypatch.setattr(step.TrainStep, "finish", poisoned)
    row = run(cfg_factory(*SMALL, "train.max_steps=20", "train.optimizer_impl=fused", "train.log_every=5"))
    assert row["status"] == "diverged" and row["error"] == "training loss is nan at step 7", row["error"]
    for name, before in kept["b"].items():
        assert torch.equal(before, kept["after"][name]), name  # found_inf: the update was skipped


def test_eval_batched_by_length_scores_as_one_example_at_a_time(cfg_factory, monkeypatch):
    """Evaluation sorts examples by length before batching (little padding); predictions go back in the examples'
    order (checked with a prediction that is each example's own length), so the scores equal those of batches of
    one."""
    from lorafa import models, tasks, train
    from lorafa.train import EvalSet, evaluate

    cfg = cfg_factory("task.max_eval_samples=40")
    data = tasks.load_data(cfg.task)
    tok = models.load_tokenizer(cfg.model)
    torch.manual_seed(0)
    net = models.build(cfg.model, num_labels=data.num_labels, device=CPU, dtype=torch.float32, tokenizer=tok)
    poser = tasks.poser_for(net.family, data, cfg.task, tok)
    frame = data.splits["validation"]
    ev = EvalSet("validation", poser.encode(frame), frame["label"].to_numpy())
    lengths = [len(f["input_ids"]) for f in ev.features]
    assert len(set(lengths)) > 5 and lengths != sorted(lengths)  # lengths vary, and not in order
    kw = {"device": CPU, "pad_id": tok.pad_token_id, "amp": None}
    one = evaluate(net.model, poser, ev, ["accuracy"], batch_size=1, **kw)
    batched = evaluate(net.model, poser, ev, ["accuracy"], batch_size=16, **kw)
    assert batched["accuracy"] == one["accuracy"]
    assert batched["loss"] == pytest.approx(one["loss"], rel=1e-5)
    seen = {}
    monkeypatch.setattr(poser, "score", lambda model, inputs, batch, predict:
                        (torch.zeros(()), batch["attention_mask"].sum(1).float()))
    monkeypatch.setattr(train, "compute_metrics", lambda metrics, refs, preds: seen.update(preds=preds) or {})
    evaluate(net.model, poser, ev, ["accuracy"], batch_size=16, **kw)
    assert seen["preds"].tolist() == lengths


@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-t5", "tiny-llama"])
def test_one_pass_scoring_gives_the_loss_and_predictions_of_separate_forwards(cfg_factory, model):
    """`Poser.score` (an encoder's loss and predictions from one forward; T5's encoder run once for the loss and for
    every label's words) gives the loss of the model's own forward and the labels `predict` gives."""
    from lorafa import models, tasks
    from lorafa.train import _inputs

    cfg = cfg_factory(f"model={model}", "task.max_eval_samples=12")
    data = tasks.load_data(cfg.task)
    tok = models.load_tokenizer(cfg.model)
    torch.manual_seed(0)
    net = models.build(cfg.model, num_labels=data.num_labels, device=CPU, dtype=torch.float32, tokenizer=tok)
    poser = tasks.poser_for(net.family, data, cfg.task, tok)
    feats = poser.encode(data.splits["validation"])
    batch = collate(feats, tok.pad_token_id, aligned_labels=net.family == "decoder")
    model_ = net.model.eval()
    with torch.no_grad():
        ref_loss, ref_pred = model_(**_inputs(batch)).loss, poser.predict(model_, batch)
        loss, raw = poser.score(model_, _inputs(batch), batch, True)
        no_pred = poser.score(model_, _inputs(batch), batch, False)[1]
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-7), (float(loss), float(ref_loss))
    assert poser.finish(raw.cpu()).tolist() == ref_pred.tolist() and no_pred is None
    assert poser.capturable  # every family's scoring forward may be captured (generation is not: another poser)


def _label_scores_row_by_row(model, poser, batch) -> torch.Tensor:
    """A decoder's log p(label words | prompt), each row on its own: its prompt alone, each label's words after
    it, no padding — the reference `DecoderPoser.choose`'s batched, capturable form must pick as."""
    scores = torch.zeros(batch["input_ids"].shape[0], len(poser.candidates))
    for i, (ids, p) in enumerate(zip(batch["input_ids"], batch["prompt_len"].tolist())):
        for j, cand in enumerate(poser.candidates):
            seq = torch.cat([ids[:p], torch.tensor(cand)])[None]
            logp = model(input_ids=seq).logits[0].float().log_softmax(-1)
            scores[i, j] = sum(logp[p + k - 1, t] for k, t in enumerate(cand))
    return scores


def test_decoder_label_scoring_reads_nothing_on_the_host_and_picks_as_row_by_row(cfg_factory, monkeypatch):
    """Decoders' label scoring (`DecoderPoser.choose`), batched: under a simulated capture it reads no tensor value on
    the host (what a graphed job's evaluation capture needs: a real capture fails at the first), and on a padded batch whose
    labels' words differ in length its labels' log-probabilities are, row for row, those of the row scored on its own
    (no padding), to float32 rounding, and it picks their argmax."""
    from lorafa import models, step, tasks
    from lorafa.train import _inputs

    from .conftest import HostReads

    cfg = cfg_factory("model=tiny-llama", "task.max_eval_samples=16")
    data = tasks.load_data(cfg.task)
    tok = models.load_tokenizer(cfg.model)
    torch.manual_seed(0)
    net = models.build(cfg.model, num_labels=data.num_labels, device=CPU, dtype=torch.float32, tokenizer=tok)
    poser = tasks.poser_for(net.family, data, cfg.task, tok)
    poser.candidates = [poser.candidates[0], poser.candidates[1][:1] + poser.candidates[1]]  # lengths differ
    frame = data.splits["validation"]
    short = frame[[poser.verbalise(v) == poser.label_words()[0] for v in frame["label"]]]
    feats = poser.encode(short)  # every reference answer the shorter words: the longer must still fit every row
    batch = collate(feats, tok.pad_token_id, aligned_labels=True)
    assert len(set(batch["prompt_len"].tolist())) > 1  # prompts of several lengths, padded
    model = net.model.eval()
    with torch.no_grad():
        reference = _label_scores_row_by_row(model, poser, batch)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        with step.unseen_capture(), HostReads() as mode:
            _loss, raw = poser.score(model, _inputs(batch), batch, True)
        scores = poser.label_scores(model, batch)
    assert mode.reads == [], mode.reads[0]
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-5)
    assert raw.tolist() == reference.argmax(-1).tolist()


def test_job_rows_say_how_they_stepped(cfg_factory):
    row = run(cfg_factory(*SMALL, "train.max_steps=4", "train.bucket=16"))
    assert row["compile_mode"] == "none" and row["compile_reason"].startswith("auto: eager, device cpu")
    assert row["bucket"] == 16 and row["measured_mode"] == "eager" and 0 < row["pad_frac"] < 1
    assert row["layer"] == "two_matmul" and row["graph_shapes"] == 0
    assert 0 < row["time_eval_s"] < row["wall_time_s"]
    assert not undocumented(row), f"columns docs/measurement.md does not list: {undocumented(row)}"


@pytest.mark.parametrize("in_place", [True, False])
def test_device_lr_tensors_follow_the_schedule_and_stay_the_same_tensors(in_place, monkeypatch):
    """A captured step reads each group's lr from one device tensor for its whole life: the schedule must move
    that tensor's value, step for step as with float rates — whether torch's scheduler writes into the tensor
    (`in_place`) or replaces it with a float — and its base rates must stay the configured ones (a tensor base
    rate would be overwritten by the in-place updates and compound the decay)."""
    from lorafa.train import linear_schedule

    def build():
        w = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.AdamW([{"params": [w], "lr": 1e-3}, {"params": [torch.nn.Parameter(torch.ones(2))],
                                                                "lr": 4e-3}])
        return opt, linear_schedule(opt, 2, 10)

    ref_opt, ref = build()
    opt, sched = build()
    if not in_place:  # a torch whose scheduler assigns the new rate instead of filling the tensor
        import torch.optim.lr_scheduler as lrs
        monkeypatch.setattr(lrs, "_update_param_group_val", lambda group, key, val: group.__setitem__(key, float(val)))
    device_lr = step.DeviceLR(opt, CPU)
    captured = list(device_lr.tensors)
    for _ in range(9):
        ref_opt.step()  # no gradients: nothing moves; the schedule's order (optimizer, then scheduler) is kept
        opt.step()
        ref.step()
        sched.step()
        device_lr.refresh()
        assert [g["lr"] for g in opt.param_groups] == captured  # the very tensors a graph would read
        np.testing.assert_allclose([t.item() for t in captured], [g["lr"] for g in ref_opt.param_groups], rtol=1e-6)
    assert captured[0].item() == pytest.approx(1e-3 * 1 / 8)  # step 9 of 10 after 2 warm-up: (10 - 9) / 8


@pytest.mark.parametrize("mode", ["blocks", "graph", "eager_graph", "none"])
def test_one_time_names_the_steps_that_compile_or_capture(mode, monkeypatch):
    """`blocks` compiles a shape on its first full step; graphed modes run a shape's first two full steps eager
    (compiling in `graph` mode) and capture it on the third: those steps are one-time work, not the mode's speed.
    An epoch's partial batch (run eager), replays and eager mode never are."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return type("Out", (), {"loss": (self.w * x.float()).mean()})()

    monkeypatch.setattr(step, "capture", lambda body, **kw: (FakeGraph(body), "pool"))
    net = Net()
    ts = step.TrainStep(net, None, mode=mode, device=CPU, amp=None, max_grad_norm=None,
                        accumulators=step.Accumulators(40, CPU), device_checks=True)
    a, b = {"x": torch.ones(4, 16)}, {"x": torch.ones(4, 32)}
    seen = []
    for at, (batch, full) in enumerate([(a, True), (a, True), (b, False), (a, True), (b, True), (a, True), (b, True),
                                        (b, True), (b, True), (a, True)]):
        seen.append(ts.one_time(batch, full=full))
        ts.run(batch, at, full=full)
    compiled = {"blocks": [0, 4], "graph": [0, 1, 3, 4, 6, 7], "eager_graph": [0, 1, 3, 4, 6, 7], "none": []}[mode]
    assert [at for at, flag in enumerate(seen) if flag] == compiled


def _owner(body):
    """The TrainStep whose training step `body` is (None: an evaluation forward's body)."""
    return next((c.cell_contents for c in body.__closure__ if isinstance(c.cell_contents, step.TrainStep)), None)


class FakeGraph:
    """A stand-in for a captured CUDA graph on CPU: capturing runs nothing, each replay runs the captured step on
    the graph's static inputs — as a real graph does — and leaves the gradients' Python attributes as a replay
    does (untouched: None)."""

    def __init__(self, body):
        self.body = body
        owner = _owner(body)
        self.params = list(owner.model.parameters()) if owner is not None else []  # an eval forward: no gradients
        self.replays = 0

    def replay(self):
        self.body()
        self.replays += 1
        for p in self.params:
            p.grad = None


def test_the_graph_modes_logic_on_cpu_trains_exactly_as_eager(cfg_factory, monkeypatch):
    """The graph modes' bookkeeping, run on CPU with a stand-in capture (`FakeGraph`): per-shape warm-up, capture
    and replays from static inputs refilled each step, several length buckets sharing the run, an epoch's partial
    batch eager, a failed capture leaving its shape eager — the loss curve and scores equal eager's (to float32
    rounding)."""
    captures, eval_captures = [], []

    def fake_capture(body, *, device, pool, strict):
        if _owner(body) is None:  # an evaluation forward
            eval_captures.append(body)
            return FakeGraph(body), "pool"
        static = next(c.cell_contents for c in body.__closure__ if isinstance(c.cell_contents, dict))
        key = tuple(t.shape[1] for t in static.values() if t.ndim == 2)
        captures.append(key)
        if len(captures) == 2:  # the second shape's capture fails: that shape runs eager from then on
            raise RuntimeError("operation not permitted when stream is capturing")
        return FakeGraph(body), "pool"

    common = [*SMALL, "task.max_train_samples=90", "train.batch_size=4", "task.max_seq_len=64", "train.bucket=16",
              "train.epochs=2", "train.optimizer_impl=fused", "train.log_every=4", "train.measure_warmup_steps=3",
              "train.eval_batch_size=6"]  # several eval batches a shape
    eager = run(cfg_factory(*common, "train.compile=none"))
    monkeypatch.setattr(step, "graph_blockers", lambda cfg, device: [])
    monkeypatch.setattr(step, "capture", fake_capture)
    capture_steps = []
    real_capture = step.TrainStep._capture

    def noting(self, key, batch, at):
        capture_steps.append(at)
        return real_capture(self, key, batch, at)

    monkeypatch.setattr(step.TrainStep, "_capture", noting)
    one_time, real_one_time = [], step.TrainStep.one_time
    real_run = step.TrainStep.run

    def asked(self, batch, *, full=True):
        flag = real_one_time(self, batch, full=full)
        self._asked = flag
        return flag

    def running(self, batch, at, *, full=True):
        one_time.append((at, getattr(self, "_asked", False)))
        self._asked = False
        return real_run(self, batch, at, full=full)

    monkeypatch.setattr(step.TrainStep, "one_time", asked)
    monkeypatch.setattr(step.TrainStep, "run", running)
    graphed = run(cfg_factory(*common, "train.compile=eager_graph"))
    assert eager["status"] == graphed["status"] == "ok", graphed["error"]
    assert graphed["compile_mode"] == "eager_graph" and graphed["bucket"] == 16
    assert len(set(captures)) == len(captures) >= 2  # one capture a shape, at least two shapes met
    assert graphed["graph_shapes"] == len(captures) - 1 and graphed["graph_failures"] == 1
    assert "operation not permitted" in graphed["graph_error"]
    assert graphed["graph_replays"] >= 5
    # a shape's steps before its graph (warm-ups, capture) after the warm-up are one-time work, left out of
    # tokens/s; every other step after the warm-up is timed
    late = [at for at, flag in one_time if flag and at >= 3]
    assert [at for at in capture_steps if at >= 3] and set(capture_steps) & set(late)
    assert graphed["one_time_steps"] == len(late) and eager["one_time_steps"] == 0
    assert graphed["timed_steps"] == graphed["train_steps"] - 3 - len(late)
    assert eager["timed_steps"] == eager["train_steps"] - 3
    # equal up to float32 rounding: graphs read lr from float32 tensors, eager from Python floats
    np.testing.assert_allclose(graphed["loss_curve"], eager["loss_curve"], rtol=1e-5)
    assert graphed["score"] == eager["score"] and graphed["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-5)
    # evaluation forwards too: a shape's first batch eager, its second captured, replays from then on (two
    # evaluations: after epoch 1 and at the end), each replay's outputs read before the next
    assert graphed["eval_graph_shapes"] == len(eval_captures) >= 1 and eager["eval_graph_shapes"] == 0
    assert graphed["eval_graph_replays"] >= graphed["eval_graph_shapes"]
    evals = [json.loads(r["eval_history"]) for r in (graphed, eager)]
    assert len(evals[0]) == len(evals[1]) == 2
    for g, e in zip(*evals):
        assert g == pytest.approx(e, rel=1e-5)
