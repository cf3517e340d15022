"""lorafa: a reproducible experiment-and-benchmark harness for LoRA-FA (arXiv 2308.03303).

Modules, one concept each:
    sources   where weights and data come from (hub, local paths, shipped assets)
    models    the network of a job: family, weights, head, tokenizer, adapter targets
    adapters  the LoRA / LoRA-FA layer and its injection
    methods   full / lora / lorafa as data, applied by one function
    tasks     task data, how each family is asked it, metrics
    measure   memory split and throughput, measured
    train     the training loop and evaluation
    results   result rows, provenance, the sweep table
    job       run(cfg): one job from config to row
"""

from omegaconf import OmegaConf

from .sources import asset

__version__ = "0.1.0"

# `${asset:movie_polarity/train.csv}` in the configs → the absolute path of a file shipped in lorafa/assets
OmegaConf.register_new_resolver("asset", asset, replace=True)
