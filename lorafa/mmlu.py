"""MMLU k-shot through lm-eval's Python API, on the model in memory (no reload from disk).

    scores = mmlu.evaluate(model, tokenizer, cfg.task, device, amp)   # {"mmlu_acc": …, "subjects": {…}, …}

From the hub, lm-eval's own `mmlu` group (57 `mmlu_<subject>` tasks over `cais/mmlu`: test split scored, the
dev split's first k questions as shots). From local files (`task.mmlu_path`: a directory with `dev` and `test`
files, json/jsonl/csv/parquet, columns question, subject, choices, answer — the hub dataset's own), the same
task definition — lm-eval's prompt ("{question}\\nA. …\\nD. …\\nAnswer:", choices A–D, the subject description,
first-k shots) — is written per subject into a temporary directory and loaded through `TaskManager(include_path=)`.
The average is the example-weighted mean over subjects, as lm-eval's `mmlu` group aggregates it.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import sources
from .checks import BadInput

# lm-eval's tasks/mmlu/default/_default_template_yaml
PROMPT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
LOCAL_GROUP = "lorafa_mmlu_local"


def description(subject: str) -> str:
    """lm-eval's MMLU description of a subject, before the shots and the question."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _split_file(root: Path, split: str) -> Path:
    found = sorted(p for p in root.glob(f"{split}.*") if p.suffix in (".json", ".jsonl", ".csv", ".parquet"))
    if not found:
        raise BadInput(f"task.mmlu_path={root}: no {split}.{{json,jsonl,csv,parquet}} file "
                                "(columns question, subject, choices, answer)")
    return found[0]


def check_source(tcfg: DictConfig) -> None:
    """Before training: MMLU can be had after it — `task.mmlu_path`'s dev and test files exist, or the hub is in
    reach for lm-eval's cais/mmlu. Else `BadInput`, and no compute is spent on a job that could not be scored."""
    if tcfg.get("mmlu_path"):
        root = Path(str(tcfg.mmlu_path)).expanduser()
        if not root.is_dir():
            raise BadInput(f"task.mmlu_path={root}: no such directory (expected dev.* and test.* files)")
        for split in ("dev", "test"):
            _split_file(root, split)
    elif not sources.hub_reachable():
        raise sources.HubUnavailable("the MMLU dataset cais/mmlu (lm-eval); or set task.mmlu_path=DIR with dev.* and "
                                     "test.* files (question, subject, choices, answer)")


def local_tasks(mmlu_path: str | Path, workdir: Path, subjects: list[str] | None = None) -> list[str]:
    """Write one lm-eval task per subject of the local MMLU files into `workdir` (+ the group); returns the
    subjects."""
    import json

    import yaml

    from .tasks import read_table

    root = Path(mmlu_path).expanduser()
    frames = {split: read_table(str(_split_file(root, split))) for split in ("dev", "test")}
    for split, frame in frames.items():
        missing = {"question", "subject", "choices", "answer"} - set(frame.columns)
        if missing:
            raise BadInput(f"task.mmlu_path={root}: the {split} file has no column {sorted(missing)}")
    found = sorted(set(frames["test"]["subject"]))
    chosen = found if not subjects else [s for s in found if s in set(subjects)]
    if subjects and len(chosen) != len(set(subjects)):
        raise BadInput(f"task.mmlu_subjects {sorted(set(subjects) - set(found))} are not in {root}: {found}")
    names = []
    for subject in chosen:
        files = {}
        for split, frame in frames.items():
            rows = frame[frame["subject"] == subject]
            files[split] = workdir / f"{subject}_{split}.jsonl"
            with open(files[split], "w", encoding="utf-8") as f:
                for r in rows.to_dict("records"):
                    choices = r["choices"].tolist() if hasattr(r["choices"], "tolist") else r["choices"]
                    if isinstance(choices, str):  # csv: the list as text
                        choices = json.loads(choices)
                    f.write(json.dumps({"question": r["question"], "choices": list(choices),
                                        "answer": int(r["answer"])}, ensure_ascii=False) + "\n")
        task = {"task": f"{LOCAL_GROUP}_{subject}", "task_alias": subject, "dataset_path": "json",
                "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
                "output_type": "multiple_choice", "doc_to_text": PROMPT, "doc_to_choice": ["A", "B", "C", "D"],
                "doc_to_target": "answer",
                "description": description(subject),
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": 1.0}}
        (workdir / f"{subject}.yaml").write_text(yaml.safe_dump(task, allow_unicode=True))
        names.append(task["task"])
    group = {"group": LOCAL_GROUP, "task": names, "metadata": {"version": 1},
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}
    (workdir / "_group.yaml").write_text(yaml.safe_dump(group))
    return chosen


@contextmanager
def _as_one_process():
    """lm-eval returns results only where LOCAL_RANK is 0. Under torchrun every process evaluates the whole set on
    the model it holds (FSDP needs every process in each forward), so each is shown as the only one."""
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = saved


def evaluate(model, tokenizer, tcfg: DictConfig, device: torch.device, amp: torch.dtype | None = None) -> dict:
    """{"mmlu_acc": average, "subjects": {subject: accuracy}, "mmlu_examples": n} of `model` as it is now."""
    from lm_eval import simple_evaluate
    from lm_eval.api.metrics import aggregate_subtask_metrics
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    shots = int(tcfg.get("num_fewshot", 5))
    subjects = list(tcfg.get("mmlu_subjects") or [])
    was_training = model.training
    model.eval()
    with tempfile.TemporaryDirectory(prefix="lorafa-mmlu-") as tmp:
        if tcfg.get("mmlu_path"):
            chosen = local_tasks(tcfg.mmlu_path, Path(tmp), subjects or None)
            manager, group, prefix = TaskManager(include_path=tmp, include_defaults=False), LOCAL_GROUP, LOCAL_GROUP
            tasks = [group]
        else:
            if not sources.hub_reachable():
                raise sources.HubUnavailable("the MMLU dataset cais/mmlu (lm-eval); or set task.mmlu_path=DIR with "
                                             "dev.* and test.* files (question, subject, choices, answer)") from None
            manager, group, prefix = TaskManager(), "mmlu", "mmlu"
            tasks = [f"mmlu_{s}" for s in subjects] if subjects else [group]
            chosen = subjects
        extra = {}
        if amp and "mixed_precision_dtype" in inspect.signature(HFLM.__init__).parameters:
            extra["mixed_precision_dtype"] = amp  # HFLM wraps each forward in its own autocast (off unless told)
        # the model's own context length unless told (lm-eval reads it from the config): training on shorter
        # sequences to save memory must not cut the 5-shot prompts; cut prompts are counted, not only logged
        lm = _counting(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=int(tcfg.get("mmlu_batch_size") or 8),
                             max_length=int(tcfg.mmlu_max_length) if tcfg.get("mmlu_max_length") else None,
                             device=str(device), **extra)
        with _as_one_process(), torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, task_manager=manager, log_samples=False,
                                  bootstrap_iters=0, limit=tcfg.get("mmlu_limit"), verbosity="WARNING")
    model.train(was_training)
    results = out["results"]
    per_subject = {k.removeprefix(f"{prefix}_"): float(v["acc,none"]) for k, v in results.items()
                   if k.startswith(f"{prefix}_") and "acc,none" in v and k.removeprefix(f"{prefix}_") not in
                   ("stem", "other", "social_sciences", "humanities")}
    sizes = {k.removeprefix(f"{prefix}_"): n["effective"] for k, n in out.get("n-samples", {}).items()}
    if group in results:
        average = float(results[group]["acc,none"])
    else:  # a list of subjects: their example-weighted mean, as the group aggregates it
        weights = [sizes.get(s, 0) for s in per_subject]
        average = aggregate_subtask_metrics(list(per_subject.values()), weights) if sum(weights) else 0.0
    return {"mmlu_acc": average, "subjects": per_subject, "mmlu_examples": int(sum(sizes.get(s, 0)
                                                                                 for s in per_subject)),
            "num_fewshot": shots, "subjects_evaluated": chosen or sorted(per_subject),
            "mmlu_truncated": len(lm.truncated), "mmlu_max_length": int(lm.max_length)}


def _counting(hflm_class):
    """lm-eval's HFLM that also records which contexts its log-likelihood requests cut from the left (context +
    continuation longer than max_length + 1 tokens: lm-eval only logs a warning for each)."""

    class Counting(hflm_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.truncated: set[str] = set()

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            for (context, _), context_enc, continuation_enc in requests:
                if len(context_enc) + len(continuation_enc) > self.max_length + 1:
                    self.truncated.add(context)
            return super()._loglikelihood_tokens(requests, *args, **kwargs)

    return Counting


def zero_shot_prompts(tcfg: DictConfig) -> list[tuple[str, str]]:
    """(prompt, longest answer) of every test question, 0-shot, as lm-eval poses them (the subject's description,
    then the question in PROMPT's layout): from `task.mmlu_path`, else from cais/mmlu on the hub."""
    from lm_eval.utils import apply_template

    from .tasks import read_table

    if tcfg.get("mmlu_path"):
        frame = read_table(str(_split_file(Path(str(tcfg.mmlu_path)).expanduser(), "test")))
    else:
        import datasets

        frame = sources.from_hub("the MMLU test split of", lambda r: datasets.load_dataset(r, "all", split="test"),
                                 "cais/mmlu").to_pandas()
    subjects = set(tcfg.get("mmlu_subjects") or [])
    out = []
    for r in frame.to_dict("records"):
        if subjects and r["subject"] not in subjects:
            continue
        choices = r["choices"]
        if isinstance(choices, str):
            import json

            choices = json.loads(choices)
        body = apply_template(PROMPT, {"question": str(r["question"]), "choices": list(choices)})  # as lm-eval does
        out.append((description(r["subject"]) + body, " D"))
    return out


def check_max_length(tcfg: DictConfig, tokenizer) -> int:
    """An explicit `task.mmlu_max_length` must hold the longest 0-shot prompt and its answer; else `BadInput`
    before any training. Returns that longest length in tokens."""
    prompts = zero_shot_prompts(tcfg)
    longest = max((len(tokenizer(p + a)["input_ids"]) for p, a in prompts), default=0)
    wanted = tcfg.get("mmlu_max_length")
    if wanted and longest > int(wanted) + 1:  # lm-eval cuts context + answer beyond max_length + 1 tokens
        raise BadInput(f"task.mmlu_max_length={wanted}: shorter than the longest 0-shot MMLU prompt ({longest} tokens "
                       f"with its answer), which lm-eval would cut from the left; expected ≥ {longest - 1}, or null "
                       "for the model's own context length")
    return longest
