"""lorafa: a reproducible experiment-and-benchmark harness for LoRA-FA (arXiv 2308.03303).

Modules, one concept each:
    sources   where weights and data come from (hub, local paths, shipped assets)
    models    the network of a job: family, weights, head, tokenizer, adapter targets
    adapters  the LoRA / LoRA-FA layer and its injection
    methods   full / lora / lorafa as data, applied by one function
    tasks     task data, how each family is asked it, metrics
    mmlu      MMLU k-shot through lm-eval on the model in memory (instruction tasks)
    measure   memory split and throughput, measured
    train     the training loop and evaluation
    distributed  one job on several processes under torchrun: DDP or FSDP (train.strategy)
    results   result rows, provenance, the sweep table
    job       run(cfg): one job from config to row
    report    what the analysis notebooks share: reading rows, published numbers, paired statistics, output
"""

from omegaconf import OmegaConf

from .sources import asset, experiments_root


def hparam(key: str, default=None, *, _root_):
    """`${hparam:lr}` in an experiment file: its `hparams.<method>.<model>.<task>.<key>` for this job, falling back
    to `hparams.<method>.<model>.<key>`, then `hparams.<method>.<key>`, then `default` (published per-task
    settings as data: one table in the file, no per-job branches)."""
    method, model, task = _root_.method.name, _root_.model.alias, _root_.task.name
    for path in (f"{method}.{model}.{task}.{key}", f"{method}.{model}.{key}", f"{method}.{key}"):
        value = OmegaConf.select(_root_, f"hparams.{path}", default=None)
        if value is not None:
            return value
    if default is None:
        raise KeyError(f"hparams has no {key!r} for method={method} model={model} task={task} and no default")
    return default


__version__ = "0.1.0"

# `${asset:movie_polarity/train.csv}` in the configs → the absolute path of a file shipped in lorafa/assets
OmegaConf.register_new_resolver("asset", asset, replace=True)
# `${lorafa_root:}` in conf/config.yaml's hydra.searchpath → the folder holding experiments/ (its yaml files are the
# `experiments` config group: python run.py experiments=memory_vs_batch)
OmegaConf.register_new_resolver("lorafa_root", experiments_root, replace=True)
OmegaConf.register_new_resolver("hparam", hparam, replace=True)
