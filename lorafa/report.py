"""Reports: what every analysis notebook (analysis/*.py) shares: reading result rows, published reference numbers,
paired statistics, and writing a table (markdown + LaTeX) or a figure (PNG + PDF) named after its experiment.

A notebook reads only parquet result tables: `results/*.parquet` by default, or the files `python -m analysis
--results ...` names (a sweep's `results.parquet`). Rows say which experiment they belong to (`experiment`
column; tables committed before that column existed take their file's name). Every table and figure states the
model, data, device and commit of the rows it shows.
"""

from __future__ import annotations

import glob
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]  # the checkout (results/ and analysis/ live beside lorafa/)
DEFAULT_RESULTS = [str(ROOT / "results" / "*.parquet")]
DEFAULT_OUT = ROOT / "analysis" / "out"


@dataclass
class Params:
    results: list[str] = field(default_factory=lambda: list(DEFAULT_RESULTS))  # parquet files or globs
    out: Path = DEFAULT_OUT


_PARAMS = Params()  # `python -m analysis` sets this before running each notebook


def params() -> Params:
    """The notebook's parameters: those `python -m analysis` was given, else the defaults (in Jupyter)."""
    return _PARAMS


def set_params(results: list[str] | None = None, out: str | Path | None = None) -> Params:
    global _PARAMS
    _PARAMS = Params(results=list(results) if results else list(DEFAULT_RESULTS), out=Path(out or DEFAULT_OUT))
    return _PARAMS


# ------------------------------------------------------------------------------------------------- reading rows
def load(paths: list[str] | None = None) -> pd.DataFrame:
    """Every row of the given parquet files (globs expanded), with `experiment` filled from the file name where a
    table predates the column, and `source_file` saying where each row came from."""
    files = sorted({f for p in (paths or params().results) for f in (glob.glob(str(p)) or [])})
    frames = []
    for f in files:
        frame = pd.read_parquet(f)
        stem = Path(f).stem
        if "experiment" not in frame:
            frame["experiment"] = stem
        frame["experiment"] = frame["experiment"].fillna("").replace("", stem)
        inside = Path(f).resolve().is_relative_to(ROOT)
        frames.append(frame.assign(source_file=os.path.relpath(Path(f).resolve(), ROOT) if inside else f))
    if not frames:
        return pd.DataFrame(columns=["experiment", "status"])
    table = pd.concat(frames, ignore_index=True)
    # integer columns (batch_size, seq_len, rank, …) that a table without them would turn into floats for every row:
    # `rows` gives them back to each experiment whose rows all have them
    table.attrs["int_columns"] = sorted(
        {c for f in frames for c in f.columns if pd.api.types.is_integer_dtype(f[c])}
        - {c for f in frames for c in f.columns if not pd.api.types.is_integer_dtype(f[c])})
    return table


def rows(table: pd.DataFrame, experiment: str, *, ok_only: bool = True, tuned: str = "selected") -> pd.DataFrame:
    """The rows of one experiment (status ok unless asked otherwise), with every column a result row has (missing
    ones as empty), so a notebook works the same on an older table or on none. Rows of a tuned protocol
    (`protocol=tuned`: an lr grid per method) are its final runs — each method at the lr its held-out slice chose
    (`lorafa.protocols.select`, over all the rows loaded) — unless `tuned="all"`."""
    from .results import REQUIRED_COLUMNS

    sel = table[table["experiment"] == experiment]
    if tuned == "selected" and "protocol" in sel and (sel["protocol"] == "tuned").any():
        from .protocols import SELECTION_COLUMNS, select

        sel = select(sel.drop(columns=SELECTION_COLUMNS, errors="ignore"))
        sel = sel[(sel["protocol"] != "tuned") | sel["selected"].astype(bool)]
    if ok_only and "status" in sel:
        sel = sel[sel["status"] == "ok"]
    for c in table.attrs.get("int_columns", ()):
        if c in sel and sel[c].dtype.kind == "f" and sel[c].notna().all():
            sel = sel.assign(**{c: sel[c].astype("int64")})
    expected = [*REQUIRED_COLUMNS, "experiment", "method", "rank", "lr", "init", "config", "loss_curve",
                "eval_history", "gradient_checkpointing", "recompute"]
    return sel.reindex(columns=[*sel.columns, *[c for c in dict.fromkeys(expected) if c not in sel.columns]])


def variant(frame: pd.DataFrame) -> pd.Series:
    """method, plus `+ckpt` / `+recompute` where those were on: the label a memory or speed row is shown under."""
    if "variant" in frame and frame["variant"].notna().all():
        return frame["variant"]
    label = frame["method"].astype(str)
    if "gradient_checkpointing" in frame:
        label = label + frame["gradient_checkpointing"].fillna(False).map({True: "+ckpt", False: ""})
    if "recompute" in frame:
        label = label + frame["recompute"].fillna("none").map(lambda r: "" if r == "none" else "+recompute")
    return label


# ------------------------------------------------------------------------------------------ published numbers
# Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (arXiv 2106.09685), Table 2 /
# microsoft/LoRA README: RoBERTa-base on the GLUE dev sets, LoRA on W_q and W_v. MNLI: matched + mismatched
# accuracy; CoLA: Matthews correlation; STS-B: Pearson; accuracy otherwise. Values in %.
LORA_PAPER = "Hu et al. 2021 (LoRA), Table 2"
LORA_PAPER_ROBERTA_BASE = {
    "full": {"glue_mnli": 87.6, "glue_sst2": 94.8, "glue_mrpc": 90.2, "glue_cola": 63.6, "glue_qnli": 92.8,
             "glue_qqp": 91.9, "glue_rte": 78.7, "glue_stsb": 91.2},
    "lora": {"glue_mnli": 87.5, "glue_sst2": 95.1, "glue_mrpc": 89.7, "glue_cola": 63.4, "glue_qnli": 93.3,
             "glue_qqp": 90.8, "glue_rte": 86.6, "glue_stsb": 91.5},
}
# the metric each published table reports per task (our eval_<metric> column; MNLI: mean of matched and mismatched)
PAPER_METRIC = {"glue_mnli": "accuracy_mnli", "glue_sst2": "accuracy", "glue_mrpc": "accuracy",
                "glue_cola": "matthews_corr", "glue_qnli": "accuracy", "glue_qqp": "accuracy",
                "glue_rte": "accuracy", "glue_stsb": "pearson", "alpaca_mmlu": "mmlu_acc", "flan_mmlu": "mmlu_acc"}
# Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023, Table 4: LLaMA-7B fine-tuned with
# BF16 LoRA, MMLU 5-shot accuracy (%).
QLORA_PAPER = "Dettmers et al. 2023 (QLoRA), Table 4, BF16 LoRA"
QLORA_LLAMA7B_MMLU = {"alpaca_mmlu": 38.4, "flan_mmlu": 45.6}

METHOD_ORDER = ["full", "lora", "lorafa", "lorafa_v2", "frozen"]
METHOD_LABEL = {"full": "full FT", "lora": "LoRA", "lorafa": "LoRA-FA", "lorafa_v2": "LoRA-FA v2",
                "frozen": "frozen (bound)"}


def ran_fused_loss(frame: pd.DataFrame) -> pd.Series:
    """Per row, whether its step ran the fused LM loss (`fused_loss`; a row without it ran transformers')."""
    if "fused_loss" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["fused_loss"].map(lambda v: pd.notna(v) and bool(v)).astype(bool)


def method_label(name: str) -> str:
    """`lorafa+recompute` → `LoRA-FA + recompute`: the printed name of a method or variant."""
    base, *extra = str(name).split("+")
    return " + ".join([METHOD_LABEL.get(base, base), *extra])


def paper_score(frame: pd.DataFrame) -> pd.Series:
    """Each row's score as the papers report it, in %: GLUE tasks by the LoRA paper's metric (MNLI: the mean of
    matched and mismatched accuracy; the two dev sets differ in size by 0.2 %), else the row's own score; fractions
    (accuracy, correlations) × 100, BLEU/chrF as they are."""
    def one(r):
        metric = PAPER_METRIC.get(r["task"])
        if metric == "accuracy_mnli":
            value = (r.get("eval_accuracy_m", math.nan) + r.get("eval_accuracy_mm", math.nan)) / 2
        else:
            value = r.get(f"eval_{metric}", math.nan) if metric else math.nan
            value = r["score"] if pd.isna(value) else value
        return value if r["metric"] in ("bleu", "chrf", "loss") else 100 * value

    return frame.apply(one, axis=1) if len(frame) else pd.Series(dtype=float)


# --------------------------------------------------------------------------------------------------- statistics
def mean_std(values: pd.Series, digits: int = 1) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return "—"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def paired_difference(frame: pd.DataFrame, a: str, b: str, *, value: str = "paper_score",
                      by: tuple[str, ...] = ("model", "task"), pair_on: str = "seed",
                      confidence: float = 0.95) -> pd.DataFrame:
    """a − b per group, paired on `pair_on` (the same task and seed: same data order and head init), with the
    mean difference, its Student-t confidence interval (`scipy.stats.ttest_rel(...).confidence_interval`) and the
    number of pairs. Groups with one pair get no interval (NaN); an `all` row pools every pair of every group (a
    paired t-interval over all of them)."""
    from scipy import stats

    keyed = frame.set_index([*by, pair_on, "method"])[value]
    keyed = keyed[~keyed.index.duplicated(keep="last")].unstack("method")
    out = []
    if a not in keyed or b not in keyed:
        return pd.DataFrame(columns=[*by, "diff", "ci_low", "ci_high", "pairs"])
    pairs = keyed[[a, b]].dropna()
    groups = [(k if isinstance(k, tuple) else (k,), g) for k, g in pairs.groupby(level=list(range(len(by))))]
    groups.append(((*(["all"] * len(by)),), pairs))
    for key, g in groups:
        n, mean = len(g), float((g[a] - g[b]).mean()) if len(g) else math.nan
        if n >= 2:  # scipy gives one pair NaN too, but with warnings (zero degrees of freedom)
            with warnings.catch_warnings():  # identical differences: scipy warns (t = ±inf or 0/0), gives [d, d]
                warnings.simplefilter("ignore", RuntimeWarning)
                ci = stats.ttest_rel(g[a].to_numpy(float), g[b].to_numpy(float)).confidence_interval(confidence)
            lo, hi = float(ci.low), float(ci.high)
        else:
            lo = hi = math.nan
        out.append({**dict(zip(by, key)), "diff": mean, "ci_low": lo, "ci_high": hi, "pairs": n})
    return pd.DataFrame(out)


def paired_ratio(ratios, confidence: float = 0.95) -> tuple[float, float, float]:
    """(geometric mean, low, high) of ratios paired by round (one plan's speed ÷ another's, each pair timed in the
    same round): a Student-t interval on their logarithms (`scipy.stats.ttest_1samp`), back on the ratio scale.
    One ratio: no interval (NaN); identical ratios: that ratio at both ends."""
    from scipy import stats

    logs = np.log(np.asarray(list(ratios), dtype=float))
    if len(logs) == 0:
        return math.nan, math.nan, math.nan
    mean = float(np.exp(logs.mean()))
    if len(logs) < 2:
        return mean, math.nan, math.nan
    if np.ptp(logs) == 0:
        return mean, mean, mean
    ci = stats.ttest_1samp(logs, 0.0).confidence_interval(confidence)
    return mean, float(np.exp(ci.low)), float(np.exp(ci.high))


def format_ci(row, digits: int = 2) -> str:
    if math.isnan(row["diff"]):
        return "—"
    if math.isnan(row["ci_low"]):
        return f"{row['diff']:+.{digits}f} (1 pair: no interval)"
    return f"{row['diff']:+.{digits}f} [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}]"


# ------------------------------------------------------------------------------------------------------ output
def provenance(frame: pd.DataFrame) -> str:
    """One line: which devices, commits, library versions and source files the rows came from."""
    if frame.empty:
        return "no rows"
    parts = []
    for col, label in (("device", "device"), ("git_sha", "commit"), ("torch_version", "torch"),
                       ("transformers_version", "transformers"), ("source_file", "rows from")):
        if col in frame:
            vals = sorted({str(v)[:12] if col == "git_sha" else str(v) for v in frame[col].dropna()})
            if vals:
                parts.append(f"{label}: {', '.join(vals)}")
    return "; ".join(parts)


def _out(name: str) -> Path:
    out = Path(params().out)
    out.mkdir(parents=True, exist_ok=True)
    return out / name


# what the notebooks wrote, in order: `python -m analysis` makes `<out>/index.html` of it (`write_index`)
_WRITTEN: list[dict] = []
_NOTEBOOK = {"name": ""}


_MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:[\w.+-]+/)+([\w.+-]+)")


def portable(text: str) -> str:
    """`text` without this machine's absolute paths (a command a row recorded: `--out /root/out/t.parquet`): each
    is cut to its last part (`--out t.parquet`)."""
    return _MACHINE_PATH.sub(r"\1", text)


def start_notebook(name: str) -> None:
    """The outputs written from now on belong to notebook `name` (its section of the index page)."""
    _NOTEBOOK["name"] = name


def write_table(table: pd.DataFrame, name: str, *, title: str, notes: list[str] = ()) -> list[Path]:
    """`<out>/<name>.md` (title, the table, notes) and `<out>/<name>.tex` (a booktabs table with the title as
    caption). Returns the paths."""
    shown = table if not table.empty else pd.DataFrame({"": ["(no rows)"]})
    notes = [portable(n) for n in notes if n]
    _WRITTEN.append({"notebook": _NOTEBOOK["name"], "kind": "table", "name": name, "title": title,
                     "notes": notes, "html": shown.to_html(index=False, border=0, escape=True),
                     "files": [f"{name}.md", f"{name}.tex"]})
    md = [f"# {title}", "", shown.to_markdown(index=False), ""]
    md += [f"- {n}" for n in notes]
    md_path = _out(f"{name}.md")
    md_path.write_text("\n".join(md) + "\n")
    tex_path = _out(f"{name}.tex")
    # pandas escapes LaTeX's special characters (& % $ # _ { } ~ ^ \) in the cells and headers; it writes the
    # caption as given, so the title goes through the same escaping (`_tex_text`)
    styler = shown.astype(str).style.hide(axis="index")
    styler = styler.format(_tex_symbols, escape="latex").format_index(_tex_symbols, axis="columns", escape="latex")
    latex = styler.to_latex(caption=_tex_text(title), label=f"tab:{name}", hrules=True, position="t")
    tex_path.write_text(latex)
    return [md_path, tex_path]


# Non-ASCII symbols the tables use, as LaTeX: pandas' escaping leaves them as they are, and pdflatex without unicode
# packages cannot set them. Applied after the escaping (pandas escapes before a formatter), so their `$` and `\`
# stay commands.
_TEX_SYMBOLS = {"±": r"$\pm$", "−": "-", "Δ": r"$\Delta$", "×": r"$\times$", "÷": "/", "≤": r"$\le$", "—": "--",
                "¹": "$^1$", "→": r"$\rightarrow$", "★": r"$\star$"}


def _tex_symbols(text) -> str:
    text = str(text)
    for symbol, tex in _TEX_SYMBOLS.items():
        text = text.replace(symbol, tex)
    return text


def _tex_text(text: str) -> str:
    """`text` escaped as a cell of `write_table`'s LaTeX is (pandas' Styler escaping, then `_TEX_SYMBOLS`)."""
    one = pd.DataFrame([[str(text)]]).style.hide(axis="index").hide(axis="columns")
    return one.format(_tex_symbols, escape="latex").to_string(delimiter="\t").removesuffix("\n")


def figure_label(frame: pd.DataFrame) -> str:
    """What every figure states under it, from the rows it plots: device, mode (eager / graph / compiled …), batch ×
    length, the weights used and, for figures of scores, the learning rates."""
    if frame is None or len(frame) == 0:
        return "no rows"
    parts = []
    devices = sorted({"CPU" if str(d).lower() == "cpu" else str(d) for d in frame["device"].dropna()}) \
        if "device" in frame else []
    parts.append("device: " + (", ".join(devices) or "not recorded"))
    modes = set()
    if "compile_mode" in frame:
        modes |= {"eager" if m in ("none", "", "nan") else m for m in frame["compile_mode"].dropna().astype(str)}
    if "mode" in frame:  # the bench's setting
        modes |= set(frame["mode"].dropna().astype(str))
    parts.append("mode: " + (", ".join(sorted(modes)) or "eager"))
    if {"batch_size", "seq_len"} <= set(frame.columns):
        shapes = sorted({(int(b), int(n)) for b, n in zip(frame["batch_size"], frame["seq_len"])
                         if pd.notna(b) and pd.notna(n)})
        if shapes:
            shown = ", ".join(f"{b} × {n}" for b, n in shapes[:4]) + (" …" if len(shapes) > 4 else "")
            parts.append(f"batch × length: {shown}")
    weights = sorted({weights_of(r) for _, r in frame.iterrows()})
    parts.append("weights: " + "; ".join(weights[:3]) + (" …" if len(weights) > 3 else ""))
    if "fused_loss" in frame and "family" in frame:  # the LM loss (`model.fused_loss`)
        lm = frame["family"].isin(["decoder", "encoder-decoder"])
        losses = {"fused" if v else "transformers'" for v in ran_fused_loss(frame)[lm]}
        if losses:
            parts.append("LM loss: " + " and ".join(sorted(losses)))
    scored = frame[frame["score"].notna() & (frame["task"] != "synthetic")] \
        if {"score", "lr", "task"} <= set(frame.columns) else frame.iloc[:0]
    if len(scored):  # figures of scores on real data state the learning rates
        lrs = sorted(scored["lr"].dropna().unique())
        if lrs:
            parts.append("lr: " + ", ".join(f"{v:g}" for v in lrs[:6]) + (" …" if len(lrs) > 6 else ""))
    return "; ".join(parts)


def save_figure(fig, name: str, *, rows: pd.DataFrame) -> list[Path]:
    """`<out>/<name>.png` (150 dpi) and `<out>/<name>.pdf`, with `figure_label(rows)` — the device, mode, shapes,
    weights (and learning rates) of the rows plotted — written under the figure."""
    label = figure_label(rows)
    fig.text(0.5, 0.0, label, ha="center", va="top", fontsize=7, wrap=True)
    paths = [_out(f"{name}.png"), _out(f"{name}.pdf")]
    titles = [fig._suptitle.get_text()] if getattr(fig, "_suptitle", None) is not None else []
    titles += [ax.get_title() for ax in fig.axes if ax.get_title()]
    title = " — ".join(titles[:1] + ([f"panels: {'; '.join(titles[1:])}"] if titles[1:] else [])) or name
    _WRITTEN.append({"notebook": _NOTEBOOK["name"], "kind": "figure", "name": name, "title": f"{title} ({label})",
                     "files": [f"{name}.png", f"{name}.pdf"]})
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def write_index(out: Path, notebooks: list[str], failed: list[str], sources: list[str]) -> Path:
    """`<out>/index.html`: every table and figure the notebooks wrote, grouped by notebook, each table with its
    notes (the provenance line and the command among them) and each section with the command that regenerates it
    — one page to open, offline, no server. `sources`: the result files read (names, not machine paths)."""
    from html import escape

    def item(entry: dict) -> str:
        links = " · ".join(f'<a href="{escape(f)}">{escape(Path(f).suffix[1:])}</a>' for f in entry["files"])
        if entry["kind"] == "figure":
            return (f'<figure id="{escape(entry["name"])}"><img src="{escape(entry["files"][0])}" '
                    f'alt="{escape(entry["title"])}"><figcaption>{escape(entry["title"])} ({links})</figcaption>'
                    "</figure>")
        notes = "".join(f"<li>{escape(n)}</li>" for n in entry["notes"])
        return (f'<section class="table" id="{escape(entry["name"])}"><h3>{escape(entry["title"])}</h3>'
                f'{entry["html"]}<ul>{notes}</ul><p class="files">{links}</p></section>')

    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>lorafa: tables and figures</title>",
             ("<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
              "table{border-collapse:collapse;font-size:90%}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
              "img{max-width:100%}code{background:#f4f4f4}nav a{margin-right:1em}.files{font-size:85%}</style>"),
             "</head><body>", "<h1>lorafa: tables and figures</h1>",
             (f"<p>Every output of <code>python -m analysis</code>, grouped by notebook. Rows read from: "
              f"{escape(', '.join(sources)) or 'none'}.</p>"),
             "<nav>" + "".join(f'<a href="#nb-{escape(n)}">{escape(n)}</a>' for n in notebooks) + "</nav>"]
    for nb in notebooks:
        entries = [e for e in _WRITTEN if e["notebook"] == nb]
        state = " — <strong>failed</strong>" if nb in failed else ""
        parts.append(f'<h2 id="nb-{escape(nb)}">{escape(nb)}{state}</h2>')
        parts.append(f"<p>Regenerate: <code>python -m analysis --only {escape(nb)}</code> "
                     f"(notebook <code>analysis/{escape(nb)}.py</code>)</p>")
        parts += [item(e) for e in entries]
    parts.append("</body></html>")
    path = _out("index.html")
    path.write_text("\n".join(parts) + "\n")
    return path


# ------------------------------------------------------------------------------------------- accuracy tables
def _config(row) -> dict:
    import json

    try:
        return json.loads(row["config"]) if isinstance(row.get("config"), str) else {}
    except ValueError:
        return {}


def weights_of(row) -> str:
    """Where a row's model weights came from: random init, a local directory, or a hub id."""
    model = _config(row).get("model", {})
    if row.get("init", model.get("init")) == "random" or row.get("experiment") == "bench":
        return "random init"  # (the bench builds every model from its config: `lorafa.bench`)
    if model.get("path"):
        return f"pretrained, local dir {Path(str(model['path'])).name}"
    return f"pretrained, hub {model.get('name') or row['model']}"


def data_of(row) -> str:
    """Where a row's data came from: the hub dataset, local files, or the package's shipped assets."""
    task = _config(row).get("task", {})
    files = [str(v) for v in (task.get("data_files") or {}).values() if v]
    if files:
        if all("/lorafa/assets/" in f for f in files):
            return f"{row['task']} (shipped with lorafa)"
        return f"{row['task']} (local files in {Path(files[0]).parent.name}/)"
    if task.get("dataset"):
        return f"{row['task']} (hub {task['dataset']}{'/' + task['subset'] if task.get('subset') else ''})"
    return str(row["task"])


def lr_label(frame: pd.DataFrame) -> str:
    """The learning rate(s) rows trained at, and B's multiple of it where that is not 1: `0.001 (B ×4)`."""
    if frame.empty or "lr" not in frame or frame["lr"].isna().all():
        return "—"
    text = ", ".join(f"{lr:g}" for lr in sorted(frame["lr"].dropna().unique()))
    ratios = sorted(frame["b_lr_ratio"].dropna().unique()) if "b_lr_ratio" in frame else []
    if ratios and ratios != [1.0]:
        text += f" (B ×{', '.join(f'{r:g}' for r in ratios)})"
    return text


def score_table(frame: pd.DataFrame, references: dict | None = None, ref_model: str | None = None,
                ref_source: str = "", extra: dict[str, str] | None = None) -> pd.DataFrame:
    """One line per model × data × method: the paper-style score (%, or BLEU) as mean ± std over seeds, the number
    of seeds, and where a published number exists for that model, task and method, it and our delta. Published
    numbers with no row of ours are listed too, with ours as —. `extra` adds columns {label: row column} as
    mean ± std."""
    lines = []
    frame = frame.assign(paper_score=paper_score(frame)) if len(frame) else frame
    if len(frame):
        frame = frame.assign(weights=frame.apply(weights_of, axis=1), data=frame.apply(data_of, axis=1))
        order = {m: i for i, m in enumerate(METHOD_ORDER)}
        keys = frame[["model", "weights", "task", "data", "method", "metric"]].drop_duplicates()
        keys = keys.assign(o=keys["method"].map(order).fillna(99)).sort_values(["model", "task", "o"])
        for k in keys.itertuples(index=False):
            g = frame[(frame["model"] == k.model) & (frame["task"] == k.task) & (frame["method"] == k.method)
                      & (frame["weights"] == k.weights)]
            # published numbers sit beside pretrained rows only: random-init accuracy is never a reproduction
            ref = (references or {}).get(k.method, {}).get(k.task) \
                if k.model == ref_model and k.weights != "random init" else None
            mean = g["paper_score"].mean()
            lines.append({"model": k.model, "weights": k.weights, "data": k.data, "method": METHOD_LABEL.get(
                k.method, k.method), "metric": PAPER_METRIC.get(k.task, k.metric).replace("accuracy_mnli",
                "accuracy (m+mm)/2"), "lr": lr_label(g), "ours": mean_std(g["paper_score"]),
                "seeds": int(g["seed"].nunique()),
                "published": "—" if ref is None else f"{ref:.1f}",
                "Δ ours − published": "—" if ref is None else f"{mean - ref:+.1f}",
                **{label: mean_std(g[col]) if col in g else "—" for label, col in (extra or {}).items()}})
    seen = {(ln["model"], ln["data"].split(" ")[0], ln["method"]) for ln in lines if ln["published"] != "—"}
    for method, per_task in (references or {}).items():
        for task, ref in per_task.items():
            if (ref_model, task, METHOD_LABEL.get(method, method)) in seen:
                continue
            lines.append({"model": ref_model, "weights": "—", "data": task, "method": METHOD_LABEL.get(method, method),
                          "metric": PAPER_METRIC.get(task, "accuracy").replace("accuracy_mnli",
                                                                                    "accuracy (m+mm)/2"),
                          "lr": "—", "ours": "—", "seeds": 0, "published": f"{ref:.1f}", "Δ ours − published": "—"})
    table = pd.DataFrame(lines)
    if ref_source and len(table):
        table["published"] = table["published"].where(table["published"] == "—", table["published"] + " ¹")
    return table


def paired_table(frame: pd.DataFrame, against: str = "lora",
                 methods: tuple[str, ...] = ("lorafa", "lorafa_v2")) -> pd.DataFrame:
    """method − `against` per model and task, paired on the seed: mean difference and 95 % t-interval, in the
    table's score units (percentage points, or BLEU)."""
    if frame.empty:
        return pd.DataFrame()
    frame = frame.assign(paper_score=paper_score(frame))
    out = []
    for method in methods:
        d = paired_difference(frame, method, against)
        for r in d.itertuples(index=False):
            out.append({"comparison": f"{METHOD_LABEL.get(method, method)} − {METHOD_LABEL.get(against, against)}",
                        "model": r.model, "data": r.task, "pairs (seeds)": r.pairs,
                        "mean difference [95 % CI]": format_ci(r._asdict())})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------- memory sweeps
def memory_scaling(frame: pd.DataFrame, x: str, x_label: str, name: str, title: str, notes: list[str] = ()):
    """Table and figure of a memory sweep along `x` (batch_size, seq_len or rank): peak and activation memory per
    method (measured; predicted peak beside it), and the peak ratio LoRA ÷ LoRA-FA at each x."""
    import matplotlib.pyplot as plt

    frame = frame.assign(label=variant(frame)) if len(frame) else frame.assign(label=[])
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    frame = frame.iloc[sorted(range(len(frame)), key=lambda i: order.get(frame["label"].iloc[i], 99))]
    lines = []
    for (model, xv), g in frame.groupby(["model", x], sort=True):
        line = {"model": model, x_label: xv}
        if x != "batch_size":
            line["batch"] = int(g["batch_size"].iloc[0])
        if x != "seq_len":
            line["seq"] = int(g["seq_len"].iloc[0])
        for r in g.itertuples(index=False):
            lab = method_label(r.label)
            ok = r.status == "ok"
            line[f"{lab} peak GiB"] = f"{r.mem_peak_gib:.2f}" if ok else r.status
            line[f"{lab} activations GiB"] = f"{r.mem_activations_gib:.2f}" if ok else r.status
            line[f"{lab} predicted peak"] = f"{r.pred_mem_peak_gib:.2f}" if ok and not pd.isna(
                r.pred_mem_peak_gib) else "—"
        peak = g[g["status"] == "ok"].set_index("label")["mem_peak_gib"]
        if {"lora", "lorafa"} <= set(peak.index):
            line["LoRA ÷ LoRA-FA peak"] = f"{peak['lora'] / peak['lorafa']:.2f}"
        lines.append(line)
    table = pd.DataFrame(lines)
    write_table(table, name, title=title, notes=[*notes, provenance(frame)])

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ok = frame[frame["status"] == "ok"] if len(frame) else frame
    for (model, label), g in ok.groupby(["model", "label"], sort=False):
        g = g.sort_values(x)
        bound = label.startswith("frozen")  # drawn dashed: LoRA-FA's curve lies on it
        style = {"marker": "x" if bound else "o", "ls": "--" if bound else "-", "zorder": 3 if bound else 2,
                 "label": method_label(label) + (f" ({model})" if ok["model"].nunique() > 1 else "")}
        axes[0].plot(g[x], g["mem_peak_gib"], **style)
        axes[1].plot(g[x], g["mem_activations_gib"], **style)
    for ax, what in zip(axes, ("peak memory (GiB)", "saved activations (GiB)")):
        ax.set_xlabel(x_label)
        ax.set_ylabel(what)
        ax.set_xscale("log", base=2)
        if len(ok):
            ticks = sorted(set(ok[x]))
            ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.grid(alpha=0.3)
    if len(ok):
        axes[0].legend(fontsize=8)
    models = ", ".join(sorted(set(ok["model"]))) if len(ok) else "no rows"
    fig.suptitle(f"{title} — {models}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, name, rows=ok)
    return table
