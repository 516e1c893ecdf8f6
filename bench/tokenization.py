"""Tokenization: tokenize_datasets.py against the `datasets.map` + `group_texts` pipeline of HuggingFace's
`run_clm.py` (rebuilt below as the baseline), same text, same tokenizer, same number of processes.

    .venv/bin/python -m bench.tokenization                 # ~10 MB of English from ../shared/data, GPT-2 BPE
    .venv/bin/python -m bench.tokenization --copies 2 --num_proc 2 --repeats 1

Each side runs in a fresh process (fresh `datasets` cache for the baseline); wall time and peak resident
memory (the process and its workers) are measured by the operating system. Medians of --repeats runs.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

BASELINE = r'''
import sys
from itertools import chain
import datasets
from transformers import AutoTokenizer

text_file, tokenizer_dir, output_dir, num_proc, block_size = sys.argv[1:6]
num_proc, block_size = int(num_proc), int(block_size)
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
raw = datasets.load_dataset("text", data_files={"train": text_file})
tokenized = raw.map(lambda examples: tokenizer(examples["text"]), batched=True, num_proc=num_proc,
                    remove_columns=["text"])

def group_texts(examples):
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = (len(concatenated["input_ids"]) // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result

grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
grouped.save_to_disk(output_dir)
print(sum(len(ids) for ids in grouped["train"]["input_ids"]))
'''


# Linux carries a process's peak RSS across exec, so a child forked from this (large, torch-importing) process
# would report at least our size. A small wrapper forks the command instead and reports its peak (the largest
# of the command and its workers) into a file.
WRAPPER = r'''
import pathlib, resource, subprocess, sys
status = subprocess.call(sys.argv[2:])
pathlib.Path(sys.argv[1]).write_text(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(status)
'''


def measure(command, env):
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", WRAPPER, rss.name, *map(str, command)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        output = process.stdout.read()
        if process.wait() != 0:
            raise SystemExit(f"benchmark command failed: {' '.join(map(str, command))}")
        seconds = time.perf_counter() - start
        return seconds, int(Path(rss.name).read_text()) / 1024, output


def folder_bytes(folder):
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def gpt2_tokenizer(folder):
    from transformers import GPT2TokenizerFast

    source = SHARED_DATA / "gpt2-tokenizer"
    GPT2TokenizerFast(vocab=str(source / "vocab.json"), merges=str(source / "merges.txt")).save_pretrained(folder)
    return folder


def bench_text(folder, copies):
    parts = [SHARED_DATA / "jargon.txt", SHARED_DATA / "wikitext-103-raw-test.txt"]
    text = "".join(part.read_text(encoding="utf-8") for part in parts)
    path = Path(folder) / "bench.txt"
    path.write_text(text * copies, encoding="utf-8")
    return path


def run(args):
    work = Path(tempfile.mkdtemp(prefix="bench-tokenization-"))
    try:
        tokenizer = gpt2_tokenizer(work / "gpt2")
        text = bench_text(work, args.copies)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
        ours, baseline = [], []
        for repeat in range(args.repeats):
            out = work / f"ours{repeat}"
            seconds, peak, _ = measure([sys.executable, str(REPO / "tokenize_datasets.py"), "--tokenizer_name_or_path",
                                        str(tokenizer), "--train_file", str(text), "--validation_split_percentage",
                                        "0", "--num_proc", str(args.num_proc), "--output_dir", str(out)], env)
            meta = json.loads((out / "meta.json").read_text())
            ours.append((seconds, peak, folder_bytes(out), meta["splits"]["train"]["n_tokens"]))
            cache = work / f"hf-cache{repeat}"
            seconds, peak, printed = measure([sys.executable, "-c", BASELINE, str(text), str(tokenizer),
                                              str(work / f"baseline{repeat}"), str(args.num_proc),
                                              str(args.block_size)], {**env, "HF_DATASETS_CACHE": str(cache)})
            baseline.append((seconds, peak, folder_bytes(work / f"baseline{repeat}") + folder_bytes(cache),
                             int(printed.split()[-1])))
        return summarise(ours, baseline, text.stat().st_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarise(ours, baseline, text_bytes):
    def median(rows, column):
        return statistics.median(row[column] for row in rows)

    rows = {}
    for name, runs in (("ours", ours), ("baseline", baseline)):
        seconds = median(runs, 0)
        rows[name] = {"seconds": seconds, "peak_mb": median(runs, 1), "disk_bytes": median(runs, 2),
                      "tokens": runs[0][3], "mb_per_second": text_bytes / 1e6 / seconds}
        rows[name]["disk_bytes_per_token"] = rows[name]["disk_bytes"] / rows[name]["tokens"]
    return rows


def report(rows, args):
    ours, base = rows["ours"], rows["baseline"]
    print(f"tokenization, {args.copies} copies of jargon.txt + wikitext test, GPT-2 BPE, num_proc {args.num_proc}, "
          f"median of {args.repeats}")
    print(f"{'':26}{'ours':>14}{'run_clm':>14}{'ratio':>10}")
    print(f"{'throughput (MB/s)':26}{ours['mb_per_second']:14.2f}{base['mb_per_second']:14.2f}"
          f"{ours['mb_per_second'] / base['mb_per_second']:10.2f}x")
    print(f"{'peak memory (MB)':26}{ours['peak_mb']:14.0f}{base['peak_mb']:14.0f}{ours['peak_mb'] / base['peak_mb']:10.2f}x")
    print(f"{'disk bytes per token':26}{ours['disk_bytes_per_token']:14.2f}{base['disk_bytes_per_token']:14.2f}"
          f"{ours['disk_bytes_per_token'] / base['disk_bytes_per_token']:10.2f}x")
    print(f"{'tokens kept':26}{ours['tokens']:14,}{base['tokens']:14,}")
    tokens_per_second = ours["tokens"] / ours["seconds"]
    return [{"stage": f"(a) tokenization, {args.copies} x 3 MB text, GPT-2 BPE, num_proc {args.num_proc}",
             "baseline": "run_clm datasets.map+group_texts", "unit": "MB/s", "ours": ours["mb_per_second"],
             "base": base["mb_per_second"], "speedup": ours["mb_per_second"] / base["mb_per_second"],
             "ours_mb": ours["peak_mb"], "base_mb": base["peak_mb"], "memory": "process RSS",
             "tokens_per_second": tokens_per_second}]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=3, help="copies of the ~3 MB text")
    parser.add_argument("--num_proc", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not (SHARED_DATA / "jargon.txt").exists():
        raise SystemExit(f"{SHARED_DATA} is not present: the benchmark reads its text from there")
    return report(run(args), args)


if __name__ == "__main__":
    main()
