"""Truncation of decoder families other than GPT-2: logits equal the teacher run through only the kept blocks,
and generation with the KV cache equals generation without it; train.py, distiller.py and evaluate.py on them, on
one rank and two."""
import json
import math
import os
import signal

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, CohereConfig, Gemma2Config, Gemma3Config,
                          Gemma3TextConfig, GemmaConfig, GPT2Config, GPTNeoXConfig, GraniteConfig, LlamaConfig,
                          MistralConfig, OPTConfig, Phi3Config, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                          Qwen3MoeConfig)
from transformers.integrations import is_deepspeed_available

from conftest import VOCAB_SIZE, assert_one_line_error, run, torchrun
from test_truncate import call_main
from lmcompress import distillation, evaluation, training, truncation
from lmcompress.errors import UserError
from lmcompress.models import LOGIT_TRANSFORMS
from lmcompress.truncation import find_block_list, student_config, truncate_model

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "mistral": lambda: MistralConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=8),
    "phi3": lambda: Phi3Config(**SMALL, pad_token_id=0),
    "gemma": lambda: GemmaConfig(**SMALL, head_dim=8),
    # a soft cap this low changes a tiny model's logits measurably (Gemma2's default of 30 would not)
    "gemma2": lambda: Gemma2Config(**SMALL, head_dim=8, sliding_window=4, final_logit_softcapping=1.0,
                                   layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma3": lambda: Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention"] * 2),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=64),
    "opt": lambda: OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32),
    "gpt2-inverse-scaling": lambda: GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                               scale_attn_by_inverse_layer_idx=True),
    "qwen2-sliding-window": lambda: Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4,
                                                max_window_layers=2),
}

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
# Block i has a dense MLP when i is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0.
MOE_CONFIGS = {
    "qwen2-moe-sparse-step-2": lambda: Qwen2MoeConfig(**SMALL, **MOE, shared_expert_intermediate_size=16,
                                                      decoder_sparse_step=2),
    "qwen3-moe-mlp-only-layer-1": lambda: Qwen3MoeConfig(**SMALL, **MOE, head_dim=8, mlp_only_layers=[1]),
}

# Models whose logits are not the output layer's product alone (models.LOGIT_TRANSFORMS).
LOGIT_TRANSFORM_CONFIGS = {
    "cohere-logit-scale": lambda: CohereConfig(**SMALL, logit_scale=0.25),
    "granite-logits-scaling": lambda: GraniteConfig(**SMALL, logits_scaling=4.0),
}


def teacher_of(name, dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config({**CONFIGS, **MOE_CONFIGS}[name]()).to(dtype).eval()


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


@pytest.mark.parametrize("name", sorted(CONFIGS) + sorted(MOE_CONFIGS))
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


@pytest.mark.parametrize("name", sorted(CONFIGS) + sorted(MOE_CONFIGS))
def test_generation_with_and_without_cache_agree(name):
    student = truncate_model(teacher_of(name), [0, 3])
    for position, block in enumerate(student.get_submodule(find_block_list(student))):
        indices = {module.layer_idx for module in block.modules() if hasattr(module, "layer_idx")}
        assert indices == {position}, "each kept attention module indexes the KV cache by its new position"
    prompt = torch.randint(0, 64, (1, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = student.generate(prompt, use_cache=True, **kwargs)
        uncached = student.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_per_layer_config_lists_are_sliced(name):
    student = truncate_model(teacher_of(name), [1, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]


@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
@pytest.mark.parametrize("layers", [[0, 1, 3], [1, 2], [3]])
def test_moe_blocks_keep_their_teachers_mlp(name, layers):
    """Qwen-MoE blocks are sparse or dense by layer index: the student lists its dense blocks by new index."""
    teacher = teacher_of(name)
    student = truncate_model(teacher, layers)
    assert [type(student.model.layers[new].mlp) for new in range(len(layers))] == \
           [type(teacher.model.layers[old].mlp) for old in layers]


def test_blocks_that_do_not_fit_the_student_are_refused_in_one_line():
    """A config field truncation does not renumber, which ties a block's structure to its index: here block 1's
    dense MLP, hidden from the slicing by clearing mlp_only_layers after the teacher was built."""
    teacher = teacher_of("qwen3-moe-mlp-only-layer-1")
    teacher.config.mlp_only_layers = []
    with pytest.raises(UserError, match=r"^Qwen3MoeForCausalLM: truncation cannot keep these blocks "
                                        r"\(model\.layers\.0\.mlp\..*--strategy custom --layers"):
        truncate_model(teacher, [1, 2])


def test_only_per_layer_lists_are_sliced():
    config = Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=2,
                         eos_token_id=[1, 2, 3, 4])
    student = student_config(config, [1, 2])
    assert student.layer_types == ["full_attention", "sliding_attention"]
    assert student.eos_token_id == [1, 2, 3, 4]


def test_model_without_one_block_list_is_refused_in_one_line():
    class Odd(torch.nn.Module):
        config = LlamaConfig(**SMALL)

    with pytest.raises(UserError, match="Odd: truncation needs its decoder blocks in one ModuleList"):
        find_block_list(Odd())


def call_in_process(main, argv, capsys):
    """An entry point's ``main(argv)`` in this process; a one-line error fails the test with its message."""
    try:
        main([str(arg) for arg in argv])
    except SystemExit as exit_:
        pytest.fail(f"{main.__module__}.main exited {exit_.code}: {capsys.readouterr().err[-3000:]}")


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
def test_truncate_py_on_a_llama_folder(llama_teacher, tmp_path, capsys, strategy, extra, kept):
    call_in_process(truncation.main, ["--teacher_name_or_path", llama_teacher, "--strategy", strategy, *extra,
                                      "--output_dir", tmp_path / "student"], capsys)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert student.config.num_hidden_layers == len(kept)
    teacher = AutoModelForCausalLM.from_pretrained(llama_teacher).eval()
    input_ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids, use_cache=False).logits,
                                   logits_through(teacher, kept, input_ids), rtol=0, atol=0)


def test_num_layers_beyond_the_depth_is_one_line(llama_teacher, tmp_path, capsys):
    result = call_main(["--teacher_name_or_path", llama_teacher, "--strategy", "first", "--num_layers", "7",
                        "--output_dir", tmp_path / "student"], capsys)
    assert_one_line_error(result, "--num_layers 7", "6 layers")


@pytest.mark.parametrize("name", sorted(CONFIGS) + sorted(LOGIT_TRANSFORM_CONFIGS))
def test_training_and_evaluation_losses_equal_the_models_own_loss(name):
    """Training fuses the output layer into its loss only where the logits are exactly head(last hidden state),
    tied or untied (Llama, Qwen2, GPT-NeoX); a model that transforms its logits (a LOGIT_TRANSFORMS field:
    Gemma2's soft-capping, Cohere's logit_scale, Granite's logits_scaling) goes through its own forward."""
    from lmcompress.losses import next_token_targets, summed_nll
    from lmcompress.perplexity import batch_nll
    from lmcompress.training import fusable_output_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config({**CONFIGS, **LOGIT_TRANSFORM_CONFIGS}[name]()).double().eval()
    input_ids = torch.randint(0, 64, (2, 16))
    expected = model(input_ids, labels=input_ids).loss.item()
    targets = next_token_targets(input_ids)

    def mean_nll(states, weight):
        return (summed_nll(states.flatten(0, 1), targets.flatten(), weight) / (targets >= 0).sum()).item()

    def equals_own_loss(loss):
        return abs(loss - expected) <= 1e-6 + 1e-6 * abs(expected)

    hidden = model(input_ids, output_hidden_states=True).hidden_states[-1]
    transforms = [field for field in LOGIT_TRANSFORMS if getattr(model.config, field, None)]
    if transforms:
        assert not equals_own_loss(mean_nll(hidden, model.get_output_embeddings().weight)), \
            f"{transforms} change this tiny model's loss, so a fused head would be caught"
    head = fusable_output_head(model)
    assert (head is None) == bool(transforms), transforms
    chosen = mean_nll(model(input_ids).logits, None) if head is None else mean_nll(hidden, head.weight)
    assert equals_own_loss(chosen), (chosen, expected)
    nll_sum, n_scored = batch_nll(model, input_ids, torch.ones_like(input_ids), input_ids)
    # the model's own loss upcasts its logits to float32, even in a float64 model
    torch.testing.assert_close((nll_sum / n_scored).item(), expected, rtol=1e-6, atol=1e-6)


REPEATED_TEXT = ("The for statement is used to iterate over the elements of a sequence, such as a string, a tuple "
                 "or a list, or over any other iterable object.\n")


@pytest.fixture(scope="module")
def repeated_text(tmp_path_factory):
    """The data flags of a train and a validation file of one sentence repeated: a loss that falls in a few steps."""
    folder = tmp_path_factory.mktemp("repeated-text")
    for split, copies in (("train", 200), ("validation", 20)):
        (folder / f"{split}.txt").write_text(REPEATED_TEXT * copies, encoding="utf-8")
    return ["--train_file", folder / "train.txt", "--validation_file", folder / "validation.txt", "--block_size", "32"]


def logged_losses(folder):
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.parametrize("name", sorted(CONFIGS) + sorted(MOE_CONFIGS))
def test_each_family_trains_distils_and_evaluates(name, tokenizer_dir, repeated_text, tmp_path, capsys):
    """truncate.py, train.py, distiller.py and evaluate.py, their main called in this process, on a 4-block
    teacher of the family and its 2-block student: finite training losses that fall, and a finite perplexity;
    the runs leave no process group, environment variable, SIGTERM handler or TensorBoard folder behind."""
    if is_deepspeed_available():
        import deepspeed  # noqa: F401  (its import sets PYTORCH_NVML_BASED_CUDA_CHECK, once for the process)
    environment, before = dict(os.environ), (signal.getsignal(signal.SIGTERM), os.getcwd())
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    config = {**CONFIGS, **MOE_CONFIGS}[name]()
    config.vocab_size = VOCAB_SIZE
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(teacher)
    call_in_process(truncation.main, ["--teacher_name_or_path", teacher, "--strategy", "alt",
                                      "--output_dir", student], capsys)
    common = [*repeated_text, "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_steps", "4",
              "--logging_steps", "1", "--report_to", "none", "--eval_strategy", "no", "--save_strategy", "no",
              "--dataloader_num_workers", "0", "--seed", "0"]
    call_in_process(training.main, ["--model_name_or_path", student, "--output_dir", tmp_path / "pretrain",
                                    *common], capsys)
    call_in_process(distillation.main, ["--teacher_name_or_path", teacher, "--student_name_or_path", student,
                                        "--output_dir", tmp_path / "distil", *common], capsys)
    for folder in ("pretrain", "distil"):
        losses = logged_losses(tmp_path / folder)
        assert len(losses) == 4 and all(map(math.isfinite, losses)) and losses[-1] < losses[0], (folder, losses)
    call_in_process(evaluation.main, ["--model_name_or_path", tmp_path / "distil", *repeated_text,
                                      "--split", "validation", "--output_file", tmp_path / "ppl.json",
                                      "--report_to", "none"], capsys)
    evaluated = json.loads((tmp_path / "ppl.json").read_text())
    assert math.isfinite(evaluated["perplexity"]) and evaluated["n_tokens"] > 0
    assert dict(os.environ).items() ^ environment.items() == set()
    assert (signal.getsignal(signal.SIGTERM), os.getcwd()) == before
    assert not torch.distributed.is_initialized()
    assert not [path for path in tmp_path.rglob("*") if path.name == "runs" or "tfevents" in path.name]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_truncated_student_trains_distils_and_evaluates_on_two_ranks(family_teacher, corpus_files, tmp_path,
                                                                       family):
    """train.py, distiller.py and evaluate.py on a teacher and its truncated student under torchrun (gloo, two
    ranks): finite, falling loss, and the same perplexity on two ranks as on one."""
    teacher, student = family_teacher(family), tmp_path / "student"
    run(["truncate.py", "--teacher_name_or_path", teacher, "--strategy", "alt", "--output_dir", student])
    data = ["--train_file", corpus_files["train"], "--validation_file", corpus_files["validation"],
            "--block_size", "64"]
    common = [*data, "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--max_steps", "12",
              "--logging_steps", "1", "--report_to", "none", "--eval_strategy", "no"]
    run([*torchrun(2), "train.py", "--model_name_or_path", student, "--output_dir", tmp_path / "pretrain", *common])
    run([*torchrun(2), "distiller.py", "--teacher_name_or_path", teacher, "--student_name_or_path", student,
         "--output_dir", tmp_path / "distil", *common])
    for folder in ("pretrain", "distil"):
        losses = logged_losses(tmp_path / folder)
        assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], (folder, losses)
        trained = json.loads((tmp_path / folder / "train_results.json").read_text())
        assert trained["train_tokens"] == 12 * 4 * 2 * 64, "every rank trained its own batches"

    def perplexity(*launch):
        output = tmp_path / f"ppl-{len(launch)}.json"
        run([*launch, "evaluate.py", "--model_name_or_path", tmp_path / "distil", *data, "--split", "validation",
             "--output_file", output])
        return json.loads(output.read_text())

    one, two = perplexity(), perplexity(*torchrun(2))
    assert math.isfinite(one["perplexity"]) and two["world_size"] == 2 and two["n_tokens"] == one["n_tokens"]
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


def test_a_multimodal_gemma3_is_refused_in_one_line(tmp_path, capsys):
    """Gemma 3's larger checkpoints are Gemma3ForConditionalGeneration, their decoder under config.text_config."""
    config = Gemma3Config(text_config=Gemma3TextConfig(**SMALL, head_dim=8),
                          vision_config={"model_type": "siglip_vision_model", "hidden_size": 16,
                                         "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2})
    config.architectures = ["Gemma3ForConditionalGeneration"]
    config.save_pretrained(tmp_path / "gemma3")
    result = call_main(["--teacher_name_or_path", tmp_path / "gemma3", "--output_dir", tmp_path / "student"], capsys)
    assert_one_line_error(result, "Gemma3ForConditionalGeneration", "text_config", "Gemma3ForCausalLM")
    assert not (tmp_path / "student").exists()
