"""Training step, evaluation and sliding-window perplexity, each against its HuggingFace baseline, same run.

    .venv/bin/python -m bench.stages                      # GPT-2 shape 4 × 256, vocabulary 50257, real text
    .venv/bin/python -m bench.stages --n_layer 2 --repeats 2

(b) training step: train.py's LMTrainer (token folder, memory-mapped blocks) against a plain HF ``Trainer`` of
    ``run_clm.py``'s shape (a ``datasets.Dataset`` of grouped blocks, ``default_data_collator``, labels =
    input_ids), same model, batch and optimiser; median step time after warm-up steps.
    With ``--bf16`` on both sides (CPU autocast) as a second row, so that a precision regression (a product that
    falls back to float32) shows up as a ratio on any machine.
(d) evaluation: evaluate.py (non-overlapping blocks) against ``Trainer.evaluate`` over the same blocks; the
    perplexities must agree to 1e-5 (relative). The text is cut to whole blocks, as ``group_texts`` does.
(e) sliding window at stride 512, block 1024: evaluate.py ``--stride 512`` against the loop of HuggingFace's
    perplexity guide (one window per forward pass, full logits, ``labels`` masked with -100).

Every side runs in a fresh process (peak resident memory from the operating system); times are medians of
``--repeats`` runs inside that process. Text: jargon.txt (train) and WikiText-103 test from ../shared/data.
"""
import argparse
import json
import math
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
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "TRANSFORMERS_VERBOSITY": "error", "DISABLE_TQDM": "1"}


# ------------------------------------------------------------------------------------------------- the parent


def run_side(name, spec, module="bench.stages"):
    """Run one side of ``module`` in a fresh process; its result (last stdout line, JSON) with its peak memory."""
    command = [sys.executable, "-m", module, "--side", name, "--spec", json.dumps(spec)]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    out, err = process.communicate()
    if process.returncode:
        raise SystemExit(f"{module} --side {name} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def prepare(work, cli):
    """A GPT-2 tokenizer folder, a random model folder and a token folder (train: jargon, test: whole blocks)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    import torch

    from lmcompress.tokenfiles import read_meta, split_path, write_meta
    from lmcompress.tokenization import TextSources, tokenize_to_folder
    from lmcompress.vocab import load_backend_tokenizer

    source = SHARED_DATA / "gpt2-tokenizer"
    tokenizer_dir = work / "gpt2"
    GPT2TokenizerFast(vocab=str(source / "vocab.json"), merges=str(source / "merges.txt")).save_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=cli.n_embd, n_layer=cli.n_layer,
                        n_head=max(1, cli.n_embd // 64))
    model_dir = work / "model"
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    shutil.copy(tokenizer_dir / "tokenizer.json", model_dir)
    shutil.copy(tokenizer_dir / "tokenizer_config.json", model_dir)
    tokens = work / "tokens"
    sources = TextSources(files={"train": [str(SHARED_DATA / "jargon.txt")],
                                 "test": [str(SHARED_DATA / "wikitext-103-raw-test.txt")]},
                          validation_split_percentage=0)
    tokenize_to_folder(sources, load_backend_tokenizer(str(tokenizer_dir)), str(tokenizer_dir), tokens,
                       log=lambda *_: None)
    # Cut the test split to whole evaluation blocks (group_texts drops the remainder; so must the comparison).
    meta = read_meta(tokens)
    n_test = cli.eval_blocks * cli.eval_block_size
    path = split_path(tokens, "test")
    itemsize = 2 if meta["dtype"] == "uint16" else 4
    with open(path, "r+b") as handle:
        handle.truncate(n_test * itemsize)
    meta["splits"]["test"]["n_tokens"] = n_test
    write_meta(tokens, meta)
    # The sliding-window text: the first --window_tokens of the same split, in a folder of its own.
    window_tokens = work / "window-tokens"
    shutil.copytree(tokens, window_tokens)
    with open(split_path(window_tokens, "test"), "r+b") as handle:
        handle.truncate(min(cli.window_tokens, n_test) * itemsize)
    meta["splits"]["test"]["n_tokens"] = min(cli.window_tokens, n_test)
    write_meta(window_tokens, meta)
    return {"model": str(model_dir), "tokens": str(tokens), "window_folder": str(window_tokens),
            "work": str(work), **vars(cli)}


def run(cli):
    work = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    try:
        spec = prepare(work, cli)
        results = {}
        for stage in cli.stages.split(","):
            results[stage] = {side: run_side(f"{stage}:{side}", spec) for side in ("ours", "baseline")}
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- the sides


class StepTimer:
    """Trainer callback: wall time of every optimiser step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer.start)

        self.times, self.start, self.callback = [], None, Callback()

    def median(self, warmup):
        return statistics.median(self.times[warmup:])


def training_flags(spec, output_dir, bf16=False):
    return (["--bf16"] if bf16 else []) + ["--output_dir", output_dir, "--max_steps", str(spec["warmup_steps"] + spec["train_steps"]),
            "--per_device_train_batch_size", str(spec["batch_size"]), "--learning_rate", "1e-4",
            "--logging_steps", "1000", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "true", "--seed", "0", "--overwrite_output_dir"]


def train_ours(spec, bf16=False):
    from lmcompress.training import build_trainer

    trainer, _ = build_trainer(["--model_name_or_path", spec["model"], "--dataset_dir", spec["tokens"],
                                "--block_size", str(spec["block_size"]),
                                *training_flags(spec, os.path.join(spec["work"], "train-ours"), bf16)])
    return time_training(trainer, spec)


def train_baseline(spec, bf16=False):
    """run_clm.py's shape: grouped blocks in a datasets.Dataset, default_data_collator, a plain Trainer."""
    import datasets
    import numpy as np
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    from lmcompress.tokenfiles import open_split

    tokens = np.asarray(open_split(spec["tokens"], "train"), dtype=np.int64)
    block = spec["block_size"]
    blocks = tokens[: len(tokens) // block * block].reshape(-1, block).tolist()
    train = datasets.Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block] * len(blocks),
                                        "labels": blocks})
    flags = training_flags(spec, os.path.join(spec["work"], "train-baseline"))
    values = dict(zip(flags[::2], flags[1::2]))
    args = TrainingArguments(output_dir=values["--output_dir"], max_steps=int(values["--max_steps"]),
                             per_device_train_batch_size=spec["batch_size"], learning_rate=1e-4, logging_steps=1000,
                             save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                             use_cpu=True, bf16=bf16)
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
    return time_training(trainer, spec)


def time_training(trainer, spec):
    timer = StepTimer()
    trainer.add_callback(timer.callback)
    trainer.train()
    seconds = timer.median(spec["warmup_steps"])
    return {"seconds": seconds, "tokens_per_second": spec["batch_size"] * spec["block_size"] / seconds,
            "unit": "ms/step", "figure": seconds * 1000}


def evaluate_ours(spec, folder_key="tokens", block_size=None, stride=None):
    from lmcompress.evaluation import main

    block_size = block_size or spec["eval_block_size"]
    output = os.path.join(spec["work"], f"eval-ours-{stride}.json")
    argv = ["--model_name_or_path", spec["model"], "--dataset_dir", spec[folder_key], "--split", "test",
            "--block_size", str(block_size), "--per_device_eval_batch_size", str(spec["eval_batch_size"]),
            "--output_file", output, "--report_to", "none"] + (["--stride", str(stride)] if stride else [])
    runs = []
    for _ in range(spec["repeats"]):
        main(argv)
        runs.append(json.loads(Path(output).read_text()))
    seconds = statistics.median(run["runtime_seconds"] for run in runs)
    return {"seconds": seconds, "figure": seconds, "unit": "s", "perplexity": runs[0]["perplexity"],
            "n_tokens": runs[0]["n_tokens"], "tokens_per_second": runs[0]["n_tokens"] / seconds}


def evaluate_baseline(spec):
    """Non-overlapping blocks through Trainer.evaluate; perplexity = exp(eval_loss), as run_clm.py reports it."""
    import datasets
    import numpy as np
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    from lmcompress.tokenfiles import open_split

    block = spec["eval_block_size"]
    tokens = np.asarray(open_split(spec["tokens"], "test"), dtype=np.int64)
    blocks = tokens[: len(tokens) // block * block].reshape(-1, block).tolist()
    dataset = datasets.Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block] * len(blocks),
                                          "labels": blocks})
    args = TrainingArguments(output_dir=os.path.join(spec["work"], "eval-baseline"), report_to="none",
                             per_device_eval_batch_size=spec["eval_batch_size"], disable_tqdm=True, use_cpu=True)
    runs = []
    for _ in range(spec["repeats"]):
        # a fresh model each run, as evaluate.py loads one per run (a reused one runs warm: ~2x faster on CPU)
        trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(spec["model"]), args=args,
                          data_collator=default_data_collator)
        start = time.perf_counter()
        metrics = trainer.evaluate(eval_dataset=dataset)
        runs.append((time.perf_counter() - start, metrics["eval_loss"]))
    seconds = statistics.median(run[0] for run in runs)
    n_tokens = len(blocks) * (block - 1)
    # transformers 5 divides the summed NLL by every label of a block (num_items_in_batch), block of them, though
    # only block - 1 positions are scored: eval_loss is low by a factor (block - 1) / block. Undo that.
    loss = runs[0][1] * block / (block - 1)
    return {"seconds": seconds, "figure": seconds, "unit": "s", "perplexity": math.exp(loss),
            "raw_perplexity": math.exp(runs[0][1]), "n_tokens": n_tokens, "tokens_per_second": n_tokens / seconds}


def window_ours(spec):
    return evaluate_ours(spec, "window_folder", spec["window_block_size"], spec["stride"])


def window_baseline(spec):
    """HuggingFace's perplexity guide (docs: perplexity of fixed-length models), verbatim but for the model."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from lmcompress.tokenfiles import open_split

    model = AutoModelForCausalLM.from_pretrained(spec["model"]).eval()
    encodings = torch.from_numpy(np.asarray(open_split(spec["window_folder"], "test"), dtype=np.int64))[None]
    max_length, stride = spec["window_block_size"], spec["stride"]
    seq_len = encodings.size(1)
    runs = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc
            input_ids = encodings[:, begin_loc:end_loc]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            with torch.no_grad():
                outputs = model(input_ids, labels=target_ids)
                neg_log_likelihood = outputs.loss
            num_valid_tokens = (target_ids != -100).sum().item()
            num_loss_tokens = num_valid_tokens - target_ids.size(0)
            nll_sum += neg_log_likelihood * num_loss_tokens
            n_tokens += num_loss_tokens
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
        runs.append((time.perf_counter() - start, math.exp(nll_sum / n_tokens), n_tokens))
    seconds = statistics.median(run[0] for run in runs)
    return {"seconds": seconds, "figure": seconds, "unit": "s", "perplexity": runs[0][1], "n_tokens": runs[0][2],
            "tokens_per_second": runs[0][2] / seconds}


def bf16_spec(spec):
    """The bf16 row's run: the float32 row's batch, 8 timed steps after 2 of warm-up."""
    return {**spec, "warmup_steps": 2, "train_steps": 8}


SIDES = {"train:ours": train_ours, "train:baseline": train_baseline,
         "train_bf16:ours": lambda spec: train_ours(bf16_spec(spec), bf16=True),
         "train_bf16:baseline": lambda spec: train_baseline(bf16_spec(spec), bf16=True), "eval:ours": evaluate_ours,
         "eval:baseline": evaluate_baseline, "window:ours": window_ours, "window:baseline": window_baseline}


# ------------------------------------------------------------------------------------------------- reporting


def rows(results, cli):
    """Rows of the summary table (see bench.__main__)."""
    out = []
    labels = {"train": f"(b) training step, {cli.n_layer}x{cli.n_embd} GPT-2, batch {cli.batch_size}x{cli.block_size}",
              "train_bf16": f"(b) training step --bf16, {cli.n_layer}x{cli.n_embd} GPT-2, batch {cli.batch_size}x{cli.block_size}",
              "eval": f"(d) evaluation, {cli.eval_blocks} blocks of {cli.eval_block_size}, batch {cli.eval_batch_size}",
              "window": f"(e) sliding window, block {cli.window_block_size} stride {cli.stride}, "
                        f"{cli.window_tokens} tokens"}
    baselines = {"train": "HF Trainer, run_clm shape", "train_bf16": "HF Trainer --bf16, run_clm shape", "eval": "HF Trainer.evaluate", "window": "HF guide's loop"}
    for stage, sides in results.items():
        ours, base = sides["ours"], sides["baseline"]
        row = {"stage": labels[stage], "baseline": baselines[stage], "unit": ours["unit"],
               "ours": ours["figure"], "base": base["figure"], "speedup": base["seconds"] / ours["seconds"],
               "ours_mb": ours["peak_mb"], "base_mb": base["peak_mb"], "memory": ours["memory"],
               "tokens_per_second": ours["tokens_per_second"]}
        if "perplexity" in ours:
            row["note"] = (f"perplexity {ours['perplexity']:.6f} vs {base['perplexity']:.6f} "
                           f"(relative difference {abs(ours['perplexity'] / base['perplexity'] - 1):.1e}; "
                           f"tokens scored {ours['n_tokens']} vs {base['n_tokens']})")
        out.append(row)
    return out


def parser():
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="train,train_bf16,eval,window")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--train_steps", type=int, default=6, help="timed training steps (median)")
    parser.add_argument("--eval_blocks", type=int, default=32)
    parser.add_argument("--eval_block_size", type=int, default=256)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--window_block_size", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--window_tokens", type=int, default=6144)
    parser.add_argument("--repeats", type=int, default=3, help="evaluation runs per side (median)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser


def peak_memory():
    """This process's peak: allocated GPU memory on a GPU, else resident memory, in MB, and which of the two."""
    import torch

    if torch.cuda.is_available():
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "memory": "GPU allocated"}
    # VmHWM: this process's own peak RSS (ru_maxrss would include the parent's size, carried across exec)
    status = Path("/proc/self/status").read_text()
    return {"peak_mb": int(status.split("VmHWM:")[1].split()[0]) / 1024, "memory": "process RSS"}


def child(name, spec):
    print(json.dumps({**SIDES[name](spec), **peak_memory()}), flush=True)


def main(argv=None):
    cli = parser().parse_args(argv)
    if cli.side:
        return child(cli.side, json.loads(cli.spec))
    if not (SHARED_DATA / "jargon.txt").exists():
        raise SystemExit(f"{SHARED_DATA} is not present: the benchmark reads its text from there")
    table = rows(run(cli), cli)
    for row in table:
        print(f"{row['stage']}: ours {row['ours']:.3f} {row['unit']}, {row['baseline']} {row['base']:.3f} "
              f"{row['unit']}, speed-up {row['speedup']:.2f}x, peak {row['ours_mb']:.0f} vs {row['base_mb']:.0f} MB"
              + (f"; {row['note']}" if "note" in row else ""), flush=True)
    return table


if __name__ == "__main__":
    main()
