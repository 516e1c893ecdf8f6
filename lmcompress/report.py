"""The results of reproduce.sh: ``results.md``, ``results.csv`` and ``results.png`` under its OUTPUT_ROOT.

    python -m lmcompress.report --output_root outputs/reproduce-mini --prompt "The for statement"

Reads the folders that reproduce.sh writes: ``<row>/pretrain`` or ``<row>/distil`` (the first stage, when the
row has one), ``<row>/finetune`` (with ``eval_results.json`` and the test ``perplexity.json``),
``truncated/<strategy>/truncation.json`` and ``timings/<row>-<stage>.seconds``.
"""
import argparse
import csv
import json
import math
from pathlib import Path

import numpy

TABLES = {
    "kd_finetune": "Distillation while fine-tuning (the `distil` student after its distillation stage, which every row "
                   "counts in its tokens and seconds; the fine-tuned teacher teaches)",
    "compression": "Compression: truncation, pre-training and distillation",
    "cleaning": "Cleaning the pre-training data (the `alt` student pre-trained on the raw and on the cleaned corpus)",
}
# (table, row id, description, truncation strategy, folder of the run: rows that are the same run share it)
ROWS = [
    ("kd_finetune", "ft-none", "fine-tuned without KD (the compression table's `distil-kd`)", "distil", "distil-kd"),
    ("kd_finetune", "ft-kd", "fine-tuned with logit KD", "distil", "ft-kd"),
    ("kd_finetune", "ft-kd-hidden", "logit KD + hidden states (PKD)", "distil", "ft-kd-hidden"),
    ("kd_finetune", "ft-kd-attention", "logit KD + attention/value relations (MiniLM)", "distil", "ft-kd-attention"),
    ("kd_finetune", "ft-reverse-kl", "fine-tuned with reverse-KL KD", "distil", "ft-reverse-kl"),
    ("compression", "teacher", "teacher, fine-tuned", None, "teacher"),
    ("compression", "random-init", "student from random init, fine-tuned", None, "random-init"),
    ("compression", "first", "student `first` (truncation), fine-tuned", "first", "first"),
    ("compression", "distil-kd", "student `distil` + distillation, fine-tuned", "distil", "distil-kd"),
    ("compression", "alt-pretrain", "student `alt` + pre-training, fine-tuned", "alt", "alt-pretrain"),
    ("compression", "alt-kd", "student `alt` + distillation, fine-tuned", "alt", "alt-kd"),
    ("compression", "importance", "student of the blocks `block_influence` ranks highest + distillation, fine-tuned",
     "importance", "importance"),
    ("cleaning", "alt-pretrain-raw", "student `alt` pre-trained on the raw corpus, fine-tuned", "alt",
     "alt-pretrain-raw"),
    ("cleaning", "alt-pretrain-clean", "student `alt` pre-trained on the cleaned corpus (the compression table's "
     "`alt-pretrain`), fine-tuned", "alt", "alt-pretrain"),
]
FIRST_STAGES = ("pretrain", "distil")
STARTS_FROM = {"kd_finetune": "distil-kd"}  # every kd_finetune row fine-tunes distil-kd's distilled student
REFERENCE_ROWS = {"kd_finetune": "ft-none", "compression": "teacher", "cleaning": "alt-pretrain-raw"}
OFF_SCALE = 2.0  # a row above this many times its table's best test perplexity is drawn clipped at the axis edge
COLUMNS = ["table", "model", "route", "layers", "parameters", "stage1_tokens", "stage1_seconds", "finetune_tokens",
           "finetune_seconds", "validation_ppl", "test_ppl", "test_word_ppl", "cleaning_dropped"]
CLEANING_DATA = {"alt-pretrain-raw": "data/pretrain-raw", "alt-pretrain-clean": "data/pretrain"}


def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def seconds(root, name):
    path = Path(root) / "timings" / f"{name}.seconds"
    return float(path.read_text()) if path.is_file() else None


def first_stage(root, row):
    for stage in FIRST_STAGES:
        if (Path(root) / row / stage / "train_results.json").is_file():
            return stage
    return None


def layers_kept(root, row, strategy, n_layer):
    if strategy is None:
        return f"all {n_layer}" if row == "teacher" else f"{n_layer} (random)"
    record = read_json(Path(root) / "truncated" / strategy / "truncation.json")
    return ",".join(map(str, record.get("layers", []))) or "?"


def cleaning_dropped(root, row):
    """What ``--clean`` dropped from the row's pre-training corpus, by kind: ``html=12;short=40``; None elsewhere."""
    if row not in CLEANING_DATA:
        return None
    counts = (read_json(Path(root) / CLEANING_DATA[row] / "meta.json").get("cleaning") or {}).get("counts") or {}
    dropped = {kind: n for kind, n in counts.items() if kind != "kept" and n}
    total = sum(counts.values())
    if not counts:
        return "not cleaned"
    return ";".join(f"{kind}={n}" for kind, n in dropped.items()) + f" ({sum(dropped.values()) / total:.1%} of lines)"


def tokens_per_step(finetune):
    steps = read_json(finetune / "trainer_state.json").get("global_step")
    tokens = read_json(finetune / "train_results.json").get("train_tokens")
    return tokens // steps if tokens and steps else None


def collect_row(root, table, row, description, strategy, folder):
    finetune = Path(root) / folder / "finetune"
    config = read_json(finetune / "config.json")
    stage_folder = STARTS_FROM.get(table, folder)
    stage = first_stage(root, stage_folder)
    stage_results = read_json(Path(root) / stage_folder / stage / "train_results.json") if stage else {}
    test = read_json(finetune / "perplexity.json")
    n_layer = config.get("n_layer", config.get("num_hidden_layers"))
    return {
        "table": table, "model": row, "route": description, "folder": folder,
        "layers": layers_kept(root, row, strategy, n_layer),
        "parameters": read_json(finetune / "train_results.json").get("n_parameters"),
        "stage1_tokens": stage_results.get("train_tokens"),
        "stage1_seconds": seconds(root, f"{stage_folder}-{stage}") if stage else None,
        "finetune_tokens": read_json(finetune / "train_results.json").get("train_tokens"),
        "finetune_seconds": seconds(root, f"{folder}-finetune"),
        "validation_ppl": read_json(finetune / "eval_results.json").get("perplexity"),
        "test_ppl": test.get("perplexity"), "test_word_ppl": test.get("word_perplexity"),
        "cleaning_dropped": cleaning_dropped(root, row),
        "tokens_per_step": tokens_per_step(finetune),
        "frozen_positions": read_json(finetune / "distillation.json").get("freeze_pos_embs", False),
    }


def greedy_continuation(model_dir, prompt, max_new_tokens=24):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    context = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    room = context - input_ids.shape[1]
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=max(1, min(max_new_tokens, room)), do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def fmt(value, digits=2):
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if math.isfinite(value) else str(value)
    return f"{value:,}"


def by_model(rows):
    return {row["model"]: row for row in rows if row["test_ppl"] is not None}


def kd_finetune_finding(rows):
    table = by_model(rows)
    if "ft-none" not in table or len(table) < 2:
        return "Too few rows ran to compare (run every `ft-*` row)."
    base = table["ft-none"]["test_ppl"]
    best = min(table.values(), key=lambda row: row["test_ppl"])
    changes = ", ".join(f"{name} {100 * (row['test_ppl'] / base - 1):+.1f} %" for name, row in table.items()
                        if name != "ft-none")
    helps = best["model"] != "ft-none" and best["test_ppl"] < 0.99 * base
    verdict = ("KD while fine-tuning helps here" if helps
               else "every KD variant does worse than plain fine-tuning" if best["model"] == "ft-none"
               else "no KD variant beats plain fine-tuning by more than 1 % here")
    return (f"At this scale {verdict}: test perplexity against `ft-none` ({base:.2f}): {changes}. The paper applies "
            "these techniques to improve the fine-tuning of DistilGPT-2; "
            + (f"this run agrees (best: `{best['model']}`, {best['test_ppl']:.2f})." if helps
               else "this run differs.") + settings_besides_kd(table))


def settings_besides_kd(table):
    """What else than KD differs between `ft-none`'s fine-tuning (train.sh) and the KD rows' (distil.sh)."""
    base = table["ft-none"]
    others = [row for name, row in table.items() if name != "ft-none"]
    differences = []
    steps = sorted({row.get("tokens_per_step") for row in others} - {None})
    if base.get("tokens_per_step") and steps and steps != [base["tokens_per_step"]]:
        differences.append(f"tokens per optimiser step ({base['tokens_per_step']:,} against "
                           + " / ".join(f"{value:,}" for value in steps) + ")")
    if any(row.get("frozen_positions") for row in others) and not base.get("frozen_positions"):
        differences.append("position embeddings (trained against frozen)")
    differences.append("gradient clipping, Adam ε and seed (the scripts' defaults: 1, 1e-8 and 42 against 5, 1e-6 "
                       "and 56)")
    return (" Besides KD, `ft-none` (fine-tuned by `train.sh`) and the KD rows (by `distil.sh`) differ in "
            + ", ".join(differences) + ".")


def cheaper(row, other):
    return (row["stage1_seconds"] or 0) <= (other["stage1_seconds"] or 0)


def compression_finding(rows):
    table = by_model(rows)
    if "teacher" not in table:
        return "The teacher row did not run; nothing to compare against."
    teacher = table["teacher"]["test_ppl"]
    students = {name: row for name, row in table.items() if name != "teacher"}
    if not students:
        return f"Only the teacher ran ({teacher:.2f})."
    best = min(students.values(), key=lambda row: row["test_ppl"])
    ahead = all(row["test_ppl"] > teacher for row in students.values())
    text = (f"The teacher ({teacher:.2f}) is {'ahead of every student' if ahead else 'NOT ahead of every student'}; "
            f"the best student is `{best['model']}` ({best['test_ppl']:.2f}).")
    if "alt-pretrain" in table and "distil-kd" in table:
        pre, kd = table["alt-pretrain"], table["distil-kd"]
        gap = 100 * (pre["test_ppl"] / kd["test_ppl"] - 1)
        text += (f" Truncation + pre-training (`alt-pretrain`, {pre['test_ppl']:.2f}) is {gap:+.1f} % against "
                 f"distillation (`distil-kd`, {kd['test_ppl']:.2f}) in "
                 f"{fmt(pre['stage1_seconds'], 0)} s against {fmt(kd['stage1_seconds'], 0)} s of training; the paper "
                 "reports it ahead of distillation in significantly less training time"
                 + ("; this run agrees." if gap < 0 and cheaper(pre, kd) else "; this run differs."))
    return text


def cleaning_finding(rows):
    table = by_model(rows)
    if not {"alt-pretrain-raw", "alt-pretrain-clean"} <= set(table):
        return "Both cleaning rows are needed to compare."
    raw, clean = table["alt-pretrain-raw"], table["alt-pretrain-clean"]
    change = 100 * (clean["test_ppl"] / raw["test_ppl"] - 1)
    return (f"Pre-training on the cleaned corpus changes the fine-tuned test perplexity by {change:+.1f} % "
            f"({raw['test_ppl']:.2f} → {clean['test_ppl']:.2f}); cleaning dropped {clean['cleaning_dropped']}. "
            + ("The paper reports cleaning as a gain; this run agrees." if change < -1 else
               "The paper reports cleaning as a gain; at this scale the difference is within 1 %." if change <= 1
               else "The paper reports cleaning as a gain; this run differs (cleaned is worse)."))


FINDINGS = {"kd_finetune": kd_finetune_finding, "compression": compression_finding, "cleaning": cleaning_finding}


def write_markdown(path, rows, samples, prompt, title):
    header = ["model", "route", "layers kept", "parameters", "pre-train/distil tokens", "time (s)",
              "fine-tune tokens", "time (s)", "valid ppl", "test ppl", "test word ppl"]
    lines = [f"# {title}", ""]
    for table, heading in TABLES.items():
        table_rows = [row for row in rows if row["table"] == table]
        if not table_rows:
            continue
        extra = ["dropped by cleaning"] if table == "cleaning" else []
        lines += [f"## {heading}", "", "| " + " | ".join(header + extra) + " |", "|" + "---|" * len(header + extra)]
        for row in table_rows:
            cells = [row["model"], row["route"], row["layers"], fmt(row["parameters"]), fmt(row["stage1_tokens"]),
                     fmt(row["stage1_seconds"], 0), fmt(row["finetune_tokens"]), fmt(row["finetune_seconds"], 0),
                     fmt(row["validation_ppl"]), fmt(row["test_ppl"]), fmt(row["test_word_ppl"])]
            cells += [row["cleaning_dropped"] or "—"] if extra else []
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", FINDINGS[table](table_rows), ""]
    lines += [f"Greedy continuations of the prompt `{prompt}`:", ""]
    lines += [f"- **{row}**: {text!r}" for row, text in samples.items()]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def loss_history(folder, key):
    """``(epochs, values)`` of ``key`` in a run's log: epochs, not steps, since the rows' batches may differ."""
    history = read_json(Path(folder) / "trainer_state.json").get("log_history", [])
    points = [(entry["epoch"], entry[key]) for entry in history if key in entry and "epoch" in entry]
    return [epoch for epoch, _ in points], [value for _, value in points]


def in_scale(table_rows):
    """The rows the axes span: those within OFF_SCALE times the table's best test perplexity."""
    best = min(row["test_ppl"] for row in table_rows)
    return [row for row in table_rows if row["test_ppl"] <= OFF_SCALE * best]


def cost(row):
    spent = [value for value in (row["stage1_seconds"], row["finetune_seconds"]) if value is not None]
    return f"{sum(spent):,.0f} s" if spent else "? s"


def draw_bars(axis, table_rows):
    """Test perplexity per row, the axis spanning the in-scale rows; an off-scale row is clipped at the edge and
    labelled with its value."""
    shown = in_scale(table_rows)
    low, high = min(row["test_ppl"] for row in shown), max(row["test_ppl"] for row in shown)
    pad = max(high - low, 0.02 * high)
    left, right = low - pad, high + 1.7 * pad  # room on the right for the labels
    for index, row in enumerate(table_rows):
        label = f"{row['test_ppl']:.1f} · {cost(row)}"
        if row in shown:
            axis.barh(index, row["test_ppl"] - left, left=left, color="tab:blue")
            axis.text(row["test_ppl"], index, f" {label}", va="center", fontsize=8)
        else:
            axis.barh(index, right - left, left=left, color="tab:gray", hatch="//")
            axis.text(right, index, f"{label} (off scale) ▸ ", ha="right", va="center", fontsize=8,
                      bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    axis.set_yticks(range(len(table_rows)), [row["model"] for row in table_rows])
    axis.set_xlim(left, right)
    axis.invert_yaxis()


def draw_curves(axis, root, table, table_rows):
    """Each row's validation perplexity while fine-tuning, in % against the table's reference row at the same
    epoch, so rows a few per cent apart do not lie on one line; off-scale rows do not set the y range."""
    histories = {row["model"]: loss_history(Path(root) / row["folder"] / "finetune", "eval_loss")
                 for row in table_rows}
    histories = {name: history for name, history in histories.items() if history[0]}
    if not histories:
        return None
    reference = REFERENCE_ROWS[table] if REFERENCE_ROWS[table] in histories else next(iter(histories))
    ref_epochs, ref_losses = histories[reference]
    shown = {row["model"] for row in in_scale(table_rows)}
    spanned = [0.0]  # the reference row
    for name, (epochs, losses) in histories.items():
        change = [100 * math.expm1(loss - numpy.interp(epoch, ref_epochs, ref_losses))
                  for epoch, loss in zip(epochs, losses)]
        axis.plot(epochs, change, "o-", label=name if name in shown else f"{name} (off scale)")
        spanned += change if name in shown else []
    low, high = min(spanned), max(spanned)
    pad = max(high - low, 0.5) * 0.15
    axis.set_ylim(low - pad, high + pad)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return reference


def results_figure(root, rows):
    """A column per table: test perplexity per row with its training seconds (bars), then each row's validation
    perplexity while fine-tuning against the table's reference row (curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [table for table in TABLES if any(row["table"] == table and row["test_ppl"] is not None for row in rows)]
    figure, axes = plt.subplots(2, len(tables), figsize=(6 * len(tables), 8), squeeze=False)
    for column, table in enumerate(tables):
        table_rows = [row for row in rows if row["table"] == table and row["test_ppl"] is not None]
        bars, curves = axes[0][column], axes[1][column]
        draw_bars(bars, table_rows)
        stages = "the shared distillation stage + fine-tuning" if table in STARTS_FROM else "first stage + fine-tuning"
        bars.set(title=TABLES[table].split(" (")[0],
                 xlabel=f"test perplexity (axis not from 0) · wall seconds of training\n({stages})")
        reference = draw_curves(curves, root, table, table_rows)
        curves.set(xlabel="fine-tuning epoch",
                   ylabel=f"validation perplexity against `{reference}` (%)" if reference else "")
    figure.tight_layout()
    return figure


def write_plot(path, root, rows):
    import matplotlib.pyplot as plt

    figure = results_figure(root, rows)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_root", required=True)
    parser.add_argument("--prompt", default="The")
    parser.add_argument("--title", default="Compressing a decoder LM: truncation, pre-training and distillation")
    args = parser.parse_args(argv)
    root = Path(args.output_root)
    rows = [collect_row(root, *row) for row in ROWS if (root / row[4] / "finetune" / "perplexity.json").is_file()]
    samples = {row["model"]: greedy_continuation(root / row["folder"] / "finetune", args.prompt)
               for row in rows if row["table"] == "compression" or row["model"].startswith("ft-kd")}
    write_markdown(root / "results.md", rows, samples, args.prompt, args.title)
    write_csv(root / "results.csv", rows)
    write_plot(root / "results.png", root, rows)
    print((root / "results.md").read_text())


if __name__ == "__main__":
    main()
