"""`python -m bench` (`make bench`): every benchmark, each against a baseline rebuilt and measured in the same run,
then one table (the GPT-2-shapes rows have no baseline: the time and peak memory of each route at GPT-2's size).
Sizes are chosen so that the whole run fits in 15 minutes on 2 CPU cores; each module also runs alone with its own
flags (``python -m bench.distill --help``)."""
import platform
import time

import torch

from bench import distill, gpt2_shapes, stages, tokenization

RUNS = [
    (tokenization, ["--copies", "2", "--repeats", "3"]),
    (stages, []),
    (distill, ["--n_layer", "6", "--n_embd", "256", "--batch_size", "4", "--block_size", "128", "--repeats", "3"]),
    (gpt2_shapes, []),
]


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads, no GPU"


def fmt(value, digits=2):
    return "-" if value is None else f"{value:,.{digits}f}"


def table(rows):
    header = ["stage", "baseline", "ours", "baseline", "ratio (speed)", "our peak MB", "baseline peak MB",
              "memory ratio", "our tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ratio = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-"
        base = f"{fmt(row['base'])} {row['unit']}" if row["base"] is not None else "-"
        memory_ratio = f"{row['ours_mb'] / row['base_mb']:.2f}x" if row["base_mb"] else "-"
        lines.append("| " + " | ".join([
            row["stage"], row["baseline"], f"{fmt(row['ours'])} {row['unit']}", base, ratio, fmt(row["ours_mb"], 0),
            fmt(row["base_mb"], 0), f"{memory_ratio} ({row['memory']})", fmt(row["tokens_per_second"], 0)]) + " |")
    return "\n".join(lines)


def main():
    start = time.time()
    rows = []
    for module, argv in RUNS:
        print(f"== bench.{module.__name__.split('.')[-1]} {' '.join(argv)}", flush=True)
        rows += module.main(argv)
    print(f"\n== summary: {time.strftime('%Y-%m-%d')}, {machine()}, torch {torch.__version__}, "
          f"{time.time() - start:.0f} s; medians of several runs, baselines measured in this run")
    print(table(rows))
    for row in rows:
        if row.get("note"):
            print(f"- {row['stage'].split(',')[0]}: {row['note']}")


if __name__ == "__main__":
    main()
