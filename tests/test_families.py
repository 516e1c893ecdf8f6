"""Truncation of decoder families other than GPT-2: logits equal the teacher run through only the kept blocks,
and generation with the KV cache equals generation without it; train.py, distiller.py and evaluate.py on them, on
one rank and two."""
import json
import math

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma3Config, Gemma3TextConfig,
                          GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Phi3Config,
                          Qwen2Config, Qwen3Config)

from conftest import assert_one_line_error, run, torchrun
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
    "gemma": lambda: GemmaConfig(**SMALL, head_dim=8),
    "gemma2": lambda: Gemma2Config(**SMALL, head_dim=8, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma3": lambda: Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=4,
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


@pytest.mark.parametrize("name", ["llama", "gemma3", "opt", "gpt2-inverse-scaling"])
def test_generation_with_and_without_cache_agree(name):
    student = truncate_model(teacher_of(name), [0, 3])
    prompt = torch.randint(0, 64, (1, 5))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = student.generate(prompt, use_cache=True, **kwargs)
        uncached = student.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_per_layer_config_lists_are_sliced(name):
    student = truncate_model(teacher_of(name), [1, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]


def test_layer_idx_renumbered():
    student = truncate_model(teacher_of("llama"), [1, 3])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]


def test_model_without_one_block_list_is_refused_in_one_line():
    class Odd(torch.nn.Module):
        config = LlamaConfig(**SMALL)

    with pytest.raises(UserError, match="Odd: truncation needs its decoder blocks in one ModuleList"):
        find_block_list(Odd())


TEACHER_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


@pytest.fixture(scope="module")
def family_teacher(tmp_path_factory, tokenizer_dir):
    """``family_teacher(name)``: a folder with a random 6-block teacher of that family and the test tokenizer."""
    folders = {}

    def build(name):
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(f"{name}6")
            torch.manual_seed(0)
            config = TEACHER_CONFIGS[name](**{**SMALL, "vocab_size": 512, "num_hidden_layers": 6})
            AutoModelForCausalLM.from_config(config).save_pretrained(folders[name])
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folders[name])
        return folders[name]
    return build


@pytest.fixture(scope="module")
def llama_teacher(family_teacher):
    return family_teacher("llama")


@pytest.mark.parametrize("strategy, extra, kept", [
    ("alt", [], [0, 2, 4]), ("distil", ["--num_layers", "3"], [0, 3, 5]), ("first", ["--num_layers", "2"], [0, 1]),
    ("last", ["--num_layers", "2"], [4, 5]), ("custom", ["--layers", "1,5"], [1, 5])])
def test_truncate_py_on_a_llama_folder(llama_teacher, tmp_path, strategy, extra, kept):
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


@pytest.mark.parametrize("family, nproc", [("llama", 1), pytest.param("llama", 2, marks=pytest.mark.slow),
                                           pytest.param("qwen2", 2, marks=pytest.mark.slow)])
def test_a_truncated_student_trains_distils_and_evaluates(family_teacher, corpus_files, tmp_path, family, nproc):
    """train.py, distiller.py and evaluate.py on a teacher and its truncated student, on one rank or two (torchrun,
    gloo): finite, falling loss, and the same perplexity on two ranks as on one."""
    teacher, student = family_teacher(family), tmp_path / "student"
    run(["truncate.py", "--teacher_name_or_path", teacher, "--strategy", "alt", "--output_dir", student])
    launch = torchrun(nproc) if nproc > 1 else []
    data = ["--train_file", corpus_files["train"], "--validation_file", corpus_files["validation"],
            "--block_size", "64"]
    common = [*data, "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--max_steps", "12",
              "--logging_steps", "1", "--report_to", "none", "--eval_strategy", "no"]
    run([*launch, "train.py", "--model_name_or_path", student, "--output_dir", tmp_path / "pretrain", *common])
    run([*launch, "distiller.py", "--teacher_name_or_path", teacher, "--student_name_or_path", student,
         "--output_dir", tmp_path / "distil", *common])
    for folder in ("pretrain", "distil"):
        history = json.loads((tmp_path / folder / "trainer_state.json").read_text())["log_history"]
        losses = [entry["loss"] for entry in history if "loss" in entry]
        assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], (folder, losses)
        trained = json.loads((tmp_path / folder / "train_results.json").read_text())
        assert trained["train_tokens"] == 12 * 4 * nproc * 64, "every rank trained its own batches"

    def perplexity(ranks):
        output = tmp_path / f"ppl-{ranks}.json"
        run([*(torchrun(ranks) if ranks > 1 else []), "evaluate.py", "--model_name_or_path", tmp_path / "distil",
             *data, "--split", "validation", "--output_file", output])
        return json.loads(output.read_text())

    evaluated = {ranks: perplexity(ranks) for ranks in sorted({1, nproc})}
    assert math.isfinite(evaluated[1]["perplexity"]) and evaluated[nproc]["world_size"] == nproc
    assert evaluated[nproc]["n_tokens"] == evaluated[1]["n_tokens"]
    assert evaluated[nproc]["perplexity"] == pytest.approx(evaluated[1]["perplexity"], rel=1e-5)


def test_a_multimodal_gemma3_is_refused_in_one_line(tmp_path, capsys):
    """Gemma 3's larger checkpoints are Gemma3ForConditionalGeneration, their decoder under config.text_config."""
    from test_truncate import call_main

    config = Gemma3Config(text_config=Gemma3TextConfig(**SMALL, head_dim=8),
                          vision_config={"model_type": "siglip_vision_model", "hidden_size": 16,
                                         "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2})
    config.architectures = ["Gemma3ForConditionalGeneration"]
    config.save_pretrained(tmp_path / "gemma3")
    result = call_main(["--teacher_name_or_path", tmp_path / "gemma3", "--output_dir", tmp_path / "student"], capsys)
    assert_one_line_error(result, "Gemma3ForConditionalGeneration", "text_config", "Gemma3ForCausalLM")
    assert not (tmp_path / "student").exists()
