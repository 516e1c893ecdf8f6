"""Truncation of decoder families other than GPT-2: logits equal the teacher run through only the kept blocks,
and generation with the KV cache equals generation without it."""
import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          OPTConfig, Phi3Config, Qwen2Config, Qwen3Config)

from lmcompress.errors import UserError
from lmcompress.truncation import find_block_list, truncate_model

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "mistral": lambda: MistralConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=8),
    "phi3": lambda: Phi3Config(**SMALL, pad_token_id=0),
    "gemma2": lambda: Gemma2Config(**SMALL, head_dim=8, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"] * 2),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=64),
    "opt": lambda: OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32),
    "gpt2-inverse-scaling": lambda: GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                               scale_attn_by_inverse_layer_idx=True),
}


def teacher_of(name, dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[name]()).to(dtype).eval()


def logits_through(teacher, layers, input_ids):
    """The teacher's logits with its block list cut down to ``layers`` in place (the reference, not the code)."""
    parent_name, _, attribute = find_block_list(teacher).rpartition(".")
    parent = teacher.get_submodule(parent_name)
    blocks = getattr(parent, attribute)
    layer_types = getattr(teacher.config, "layer_types", None)
    setattr(parent, attribute, torch.nn.ModuleList([blocks[i] for i in layers]))
    if layer_types is not None:  # the model's forward picks block i's mask by config.layer_types[i]
        teacher.config.layer_types = [layer_types[i] for i in layers]
    try:
        return teacher(input_ids, use_cache=False).logits
    finally:
        setattr(parent, attribute, blocks)
        if layer_types is not None:
            teacher.config.layer_types = layer_types


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_truncated_logits_equal_teacher_through_kept_blocks(name):
    dtype = torch.float64 if name.startswith("gpt2") else torch.float32
    teacher = teacher_of(name, dtype)
    layers = [0, 2, 3]
    student = truncate_model(teacher, layers)
    assert student.config.num_hidden_layers == 3
    input_ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        expected = logits_through(teacher, layers, input_ids)
        got = student(input_ids, use_cache=False).logits
    if name.startswith("gpt2"):
        # the reference keeps each teacher block's own 1 / (layer_idx + 1); the student gets it from the
        # rescaled query projection, equal up to float64 rounding
        assert (got - expected).abs().max().item() < 1e-12
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "opt", "gpt2-inverse-scaling"])
def test_generation_with_and_without_cache_agree(name):
    student = truncate_model(teacher_of(name), [0, 3])
    prompt = torch.randint(0, 64, (1, 5))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = student.generate(prompt, use_cache=True, **kwargs)
        uncached = student.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_per_layer_config_lists_are_sliced():
    student = truncate_model(teacher_of("gemma2"), [1, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]


def test_layer_idx_renumbered():
    student = truncate_model(teacher_of("llama"), [1, 3])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]


def test_model_without_one_block_list_is_refused_in_one_line():
    class Odd(torch.nn.Module):
        config = LlamaConfig(**SMALL)

    with pytest.raises(UserError, match="Odd: truncation needs its decoder blocks in one ModuleList"):
        find_block_list(Odd())


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("llama6")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**{**SMALL, "vocab_size": 512, "num_hidden_layers": 6})
                                     ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("strategy, extra, kept", [
    ("alt", [], [0, 2, 4]), ("distil", ["--num_layers", "3"], [0, 3, 5]), ("first", ["--num_layers", "2"], [0, 1]),
    ("last", ["--num_layers", "2"], [4, 5]), ("custom", ["--layers", "1,5"], [1, 5])])
def test_truncate_py_on_a_llama_folder(llama_teacher, tmp_path, strategy, extra, kept):
    from conftest import run

    result = run(["truncate.py", "--teacher_name_or_path", llama_teacher, "--strategy", strategy,
                  *extra, "--output_dir", tmp_path / "student"], check=False)
    assert result.returncode == 0, result.stderr
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert student.config.num_hidden_layers == len(kept)
    teacher = AutoModelForCausalLM.from_pretrained(llama_teacher).eval()
    input_ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids, use_cache=False).logits,
                                   logits_through(teacher, kept, input_ids), rtol=0, atol=0)


def test_num_layers_beyond_the_depth_is_one_line(llama_teacher, tmp_path):
    from conftest import assert_one_line_error, run

    result = run(["truncate.py", "--teacher_name_or_path", llama_teacher, "--strategy", "first",
                  "--num_layers", "7", "--output_dir", tmp_path / "student"], check=False)
    assert_one_line_error(result, "--num_layers 7", "6 layers")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_and_evaluation_losses_equal_the_models_own_loss(name):
    """The fused loss takes the output layer only where the logits are exactly head(last hidden state); Gemma2's
    soft-capped logits go through the model's own forward. Untied heads (Llama, Qwen2, GPT-NeoX) are fused too."""
    from lmcompress.losses import next_token_targets, summed_nll
    from lmcompress.perplexity import batch_nll
    from lmcompress.training import fusable_output_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).double().eval()
    input_ids = torch.randint(0, 64, (2, 16))
    expected = model(input_ids, labels=input_ids).loss
    head = fusable_output_head(model)
    assert (head is None) == bool(getattr(model.config, "final_logit_softcapping", None))
    if head is not None:
        hidden = model(input_ids, output_hidden_states=True).hidden_states[-1]
        targets = next_token_targets(input_ids)
        fused = summed_nll(hidden.flatten(0, 1), targets.flatten(), head.weight) / (targets >= 0).sum()
        torch.testing.assert_close(fused.item(), expected.item(), rtol=1e-6, atol=1e-6)
    nll_sum, n_scored = batch_nll(model, input_ids, torch.ones_like(input_ids), input_ids)
    # the model's own loss upcasts its logits to float32, even in a float64 model
    torch.testing.assert_close((nll_sum / n_scored).item(), expected.item(), rtol=1e-6, atol=1e-6)


def test_a_truncated_llama_trains_distils_and_evaluates(llama_teacher, tokenizer_dir, corpus_files, tmp_path):
    """train.py, distiller.py and evaluate.py on a Llama teacher and its truncated student: finite, falling loss."""
    import json
    import math

    from conftest import run

    student = tmp_path / "student"
    run(["truncate.py", "--teacher_name_or_path", llama_teacher, "--strategy", "alt", "--output_dir", student])
    data = ["--train_file", corpus_files["train"], "--validation_file", corpus_files["validation"],
            "--block_size", "64"]
    common = [*data, "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--max_steps", "12",
              "--logging_steps", "1", "--report_to", "none", "--eval_strategy", "no"]
    run(["train.py", "--model_name_or_path", student, "--output_dir", tmp_path / "pretrain", *common])
    run(["distiller.py", "--teacher_name_or_path", llama_teacher, "--student_name_or_path", student,
         "--output_dir", tmp_path / "distil", *common])
    for folder in ("pretrain", "distil"):
        history = json.loads((tmp_path / folder / "trainer_state.json").read_text())["log_history"]
        losses = [entry["loss"] for entry in history if "loss" in entry]
        assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], (folder, losses)
    run(["evaluate.py", "--model_name_or_path", tmp_path / "distil", *data, "--split", "validation",
         "--output_file", tmp_path / "ppl.json"])
    assert math.isfinite(json.loads((tmp_path / "ppl.json").read_text())["perplexity"])
