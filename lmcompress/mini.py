"""Inputs of the offline mini reproduction: corpora and a tokenizer that every machine with Python has.

    python -m lmcompress.mini --output_dir outputs/reproduce-mini/inputs

Writes ``pretrain.txt`` (the standard library's docstrings mixed with real noise of the kinds ``--clean``
drops — IDLE's help HTML, repeated licence headers, short and symbol-heavy source lines: the stand-in for the raw
OpenWebText),
``finetune-{train,validation,test}.txt`` (the ``pydoc_data`` topics, by topic: every tenth topic goes to
test, the next to validation, the rest to train: the stand-in for WikiText-103), and ``tokenizer/``: GPT-2's
BPE when the hub cache has it, else a byte-level BPE trained on the docstrings, and ``teacher-config.json`` /
``student-config.json`` (``--arch gpt2`` or ``llama``, same width and depths). ``inputs.json`` is written last and
marks the folder complete.
"""
import argparse
import json
from pathlib import Path

from .atomic import write_file
from .corpus import docstrings, noisy_documents, topics, with_noise
from .jsonio import write_json
from .vocab import train_bpe_tokenizer

MINI_VOCAB_SIZE = 8192


def finetune_split(index):
    return {0: "test", 1: "validation"}.get(index % 10, "train")


def write_text(path, documents):
    write_file(path, "\n\n".join(documents) + "\n")


def cached_gpt2_tokenizer(folder):
    """GPT-2's tokenizer from the local hub cache, saved into ``folder``; None when the cache lacks it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained("gpt2", local_files_only=True)
    except (OSError, ValueError):
        return None
    tokenizer.save_pretrained(folder)
    return tokenizer


def model_config(arch, vocab_size, block_size, width, n_layer, n_head=4):
    if arch == "gpt2":
        return {"model_type": "gpt2", "vocab_size": vocab_size, "n_positions": block_size, "n_embd": width,
                "n_layer": n_layer, "n_head": n_head, "bos_token_id": 0, "eos_token_id": 0}
    if arch == "llama":
        return {"model_type": "llama", "vocab_size": vocab_size, "max_position_embeddings": block_size,
                "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": n_layer,
                "num_attention_heads": n_head, "num_key_value_heads": n_head, "bos_token_id": 0,
                "eos_token_id": 0, "tie_word_embeddings": True}
    raise ValueError(f"--arch {arch}: use gpt2 or llama")


def prepare(output_dir, vocab_size=MINI_VOCAB_SIZE, arch="gpt2", block_size=128, width=128, teacher_layers=4,
            student_layers=2):
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pretrain = list(docstrings())
    write_text(output_dir / "pretrain.txt", list(with_noise(pretrain, noisy_documents())))
    finetune = {"train": [], "validation": [], "test": []}
    for index, document in enumerate(topics()):
        finetune[finetune_split(index)].append(document)
    for split, documents in finetune.items():
        write_text(output_dir / f"finetune-{split}.txt", documents)
    tokenizer = cached_gpt2_tokenizer(output_dir / "tokenizer")
    source = "gpt2 (hub cache)"
    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(pretrain, vocab_size, output_dir / "tokenizer", model_max_length=1024)
        source = f"byte-level BPE trained on pretrain.txt, {vocab_size} tokens"
    for name, layers in (("teacher", teacher_layers), ("student", student_layers)):
        write_json(output_dir / f"{name}-config.json",
                   model_config(arch, len(tokenizer), block_size, width, layers))
    record = {"tokenizer": source, "arch": arch, "vocab_size": len(tokenizer),
              "documents": {"pretrain": len(pretrain), **{f"finetune-{k}": len(v) for k, v in finetune.items()}}}
    write_json(output_dir / "inputs.json", record)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vocab_size", type=int, default=MINI_VOCAB_SIZE)
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--teacher_layers", type=int, default=4)
    parser.add_argument("--student_layers", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(prepare(args.output_dir, args.vocab_size, args.arch, args.block_size, args.width,
                             args.teacher_layers, args.student_layers)))


if __name__ == "__main__":
    main()
