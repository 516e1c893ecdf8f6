"""truncate.py: a shallower student made of chosen teacher blocks (the paper's "gpt2-alt", DistilGPT2's init).

Student block i is teacher block ``layers[i]``; the embeddings, the final layer norm and the LM head are the
teacher's. The depth comes from ``config.num_hidden_layers``, never from counting weight tensors. Keeping every layer
gives the teacher back exactly.
"""
import dataclasses
import functools
import os
import re
import shutil

from .atomic import replace_folder, staging_path
from .cli import parse_dataclass_args
from .errors import UserError, entry_point, removed_on_failure, require_writable_folder
from .jsonio import write_json
from .models import is_trained_model_folder, load_causal_lm, load_config
from .vocab import load_tokenizer

STRATEGIES = ("alt", "distil", "first", "last", "custom", "importance")
TRUNCATION_FILE = "truncation.json"


def alt_layers(n_layer, n_keep):
    """Every other layer from the first: 0, 2, 4, … (the paper's "gpt2-alt")."""
    if 2 * (n_keep - 1) > n_layer - 1:
        raise UserError(f"--strategy alt keeps every other layer: at most {(n_layer + 1) // 2} of {n_layer} layers, "
                        f"not {n_keep}")
    return list(range(0, 2 * n_keep, 2))


def distil_layers(n_layer, n_keep):
    """Evenly spread layers that keep the first and the last (DistilGPT2's choice, generalised).

    Layer i of the student is teacher layer ``round(i * (n_layer - 1) / (n_keep - 1))`` for i = 0 … n_keep-1,
    rounding halves up. 12 → 6 gives 0,2,4,7,9,11 (DistilGPT2); 24 → 6 gives 0,5,9,14,18,23; 36 → 6 gives
    0,7,14,21,28,35; 48 → 6 gives 0,9,19,28,38,47. One kept layer is the first.

    The original code's table has 0,4,8,13,17,21 for gpt2-medium: the 12-layer map doubled and shifted, which
    drops the last two layers, so no rule that keeps the last layer gives it. Reproduce it with
    ``--strategy custom --layers 0,4,8,13,17,21``.
    """
    if n_keep == 1:
        return [0]
    span, steps = n_layer - 1, n_keep - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(n_keep)]


def first_layers(n_layer, n_keep):
    return list(range(n_keep))


def last_layers(n_layer, n_keep):
    return list(range(n_layer - n_keep, n_layer))


LAYER_MAPS = {"alt": alt_layers, "distil": distil_layers, "first": first_layers, "last": last_layers}


def parse_layers(text, n_layer):
    """``--layers 0,2,4``: distinct teacher layers in increasing order, each in [0, n_layer)."""
    try:
        layers = [int(item) for item in text.replace(" ", "").split(",")]
    except ValueError as err:
        raise UserError(f"--layers {text}: give comma-separated layer numbers, e.g. 0,2,4") from err
    out_of_range = [layer for layer in layers if not 0 <= layer < n_layer]
    if out_of_range:
        raise UserError(f"--layers {text}: layer {out_of_range[0]} is out of range: the teacher has layers "
                        f"0 to {n_layer - 1}")
    if any(later <= earlier for earlier, later in zip(layers, layers[1:])):
        raise UserError(f"--layers {text}: list distinct layers in increasing order (the student keeps their order)")
    return layers


def select_layers(strategy, n_layer, num_layers=None, layers=None):
    """The teacher layers the student keeps, in order."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy}: unknown strategy; choose from {', '.join(STRATEGIES)}")
    if strategy == "importance":
        raise UserError("--strategy importance chooses the layers by measuring the teacher on calibration text, "
                        "not by a rule")
    if strategy == "custom":
        if not layers:
            raise UserError("--strategy custom needs --layers, e.g. --layers 0,2,4,6,8,10")
        kept = parse_layers(layers, n_layer)
        if num_layers is not None and num_layers != len(kept):
            raise UserError(f"--num_layers {num_layers} but --layers lists {len(kept)} layers")
        return kept
    if layers:
        raise UserError(f"--layers goes with --strategy custom, not --strategy {strategy}")
    n_keep = student_depth(n_layer, num_layers)
    return LAYER_MAPS[strategy](n_layer, n_keep)


def student_depth(n_layer, num_layers=None):
    n_keep = max(1, n_layer // 2) if num_layers is None else num_layers
    if not 1 <= n_keep <= n_layer:
        raise UserError(f"--num_layers {n_keep}: must be between 1 and the teacher's {n_layer} layers")
    return n_keep


def find_block_list(model):
    """The dotted name of the one ``ModuleList`` holding the model's ``num_hidden_layers`` decoder blocks."""
    import torch

    depth = model.config.num_hidden_layers
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == depth]
    if len(names) != 1:
        raise UserError(f"{type(model).__name__}: truncation needs its decoder blocks in one ModuleList of "
                        f"{depth} blocks; found {len(names)}")
    return names[0]


def decoder_blocks(model):
    return model.get_submodule(find_block_list(model))


def block_output(output):
    """The hidden states a block returns (alone or first in a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def student_state_dict(teacher_state, layers, block_list="transformer.h"):
    """The teacher's weights with block ``layers[i]`` renamed to block i and the other blocks left out."""
    new_index = {old: new for new, old in enumerate(layers)}
    block = re.compile(rf"^({re.escape(block_list)}\.)(\d+)(\..*)$")
    state = {}
    for name, tensor in teacher_state.items():
        match = block.match(name)
        if match is None:
            state[name] = tensor
        elif int(match.group(2)) in new_index:
            state[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = tensor
    return state


# Config lists that are not one value per block, however long they are.
NOT_PER_LAYER = ("architectures", "bos_token_id", "eos_token_id", "pad_token_id", "suppress_tokens",
                 "begin_suppress_tokens", "bad_words_ids", "mlp_only_layers")


def dense_mlp_layers(config, layers):
    """The student blocks with a dense MLP in a Qwen-MoE-style config, where block i is dense when i is in
    ``mlp_only_layers`` or (i + 1) is not a multiple of ``decoder_sparse_step``: the new indices of the kept dense
    blocks, which with a step of 1 give every kept block its teacher's MLP."""
    listed = set(config.mlp_only_layers)
    return [new for new, old in enumerate(layers) if old in listed or (old + 1) % config.decoder_sparse_step]


def student_config(teacher_config, layers):
    """The teacher's config with the depth set to ``len(layers)``, every per-layer list sliced to ``layers`` and
    the MoE blocks' layer indices renumbered."""
    depth = teacher_config.num_hidden_layers
    values = teacher_config.to_dict()
    for key, value in values.items():
        if isinstance(value, list) and len(value) == depth and key not in NOT_PER_LAYER:
            values[key] = [value[i] for i in layers]
    if hasattr(teacher_config, "mlp_only_layers") and hasattr(teacher_config, "decoder_sparse_step"):
        values.update(mlp_only_layers=dense_mlp_layers(teacher_config, layers), decoder_sparse_step=1)
    values[teacher_config.attribute_map.get("num_hidden_layers", "num_hidden_layers")] = len(layers)
    return teacher_config.__class__.from_dict(values)


def keep_inverse_layer_scaling(state, config, layers, block_list):
    """GPT-2's ``scale_attn_by_inverse_layer_idx`` divides block i's scores by i + 1; student block i holds
    teacher block ``layers[i]``, so its query projection is rescaled by (i + 1) / (layers[i] + 1)."""
    if not getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return state
    width = config.n_embd
    for new, old in enumerate(layers):
        factor = (new + 1) / (old + 1)
        for suffix in ("weight", "bias"):
            name = f"{block_list}.{new}.attn.c_attn.{suffix}"
            tensor = state[name].clone()
            tensor[..., :width] *= factor
            state[name] = tensor
    return state


def check_truncatable(config, flag="--teacher_name_or_path"):
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(config, "text_config", None) is not None:
        classes = ", ".join(config.architectures or [config.model_type])
        raise UserError(f"{flag}: a multimodal {config.model_type} model ({classes}) whose decoder is in its "
                        "text_config; truncation takes a text-only decoder: give a text-only checkpoint of the family "
                        "(for Gemma 3 a Gemma3ForCausalLM one, such as google/gemma-3-1b-pt)")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{flag}: a {config.model_type} model ({type(config).__name__}), which AutoModelForCausalLM "
                        "does not load; truncation takes decoder language models (GPT-2, Llama, Qwen, Mistral, "
                        "Gemma, Phi, OPT, GPT-NeoX, …)")
    if getattr(config, "num_hidden_layers", None) is None:
        raise UserError(f"{flag}: a {config.model_type} model without num_hidden_layers; truncation handles "
                        "decoder models (AutoModelForCausalLM) with their blocks in one ModuleList")


def truncate_model(teacher, layers):
    """A new model of ``len(layers)`` blocks holding the teacher's blocks ``layers`` and its other weights.

    Built from a sliced config, so each kept attention module's ``layer_idx`` is its new position and the KV
    cache indexes the student's blocks."""
    from transformers import AutoModelForCausalLM

    check_truncatable(teacher.config)
    block_list = find_block_list(teacher)
    config = student_config(teacher.config, layers)
    student = AutoModelForCausalLM.from_config(config).to(teacher.dtype)
    state = student_state_dict(teacher.state_dict(), layers, block_list)
    state = keep_inverse_layer_scaling(state, config, layers, block_list)
    check_blocks_fit(student.state_dict(), state, type(teacher).__name__)
    student.load_state_dict(state, strict=True)
    return student.eval()


def check_blocks_fit(student_state, state, teacher_class):
    """Refuse in one line a student whose blocks are not the kept teacher blocks: a config field the slicing does
    not know makes the block structure depend on the layer index."""
    expected = {name: tuple(tensor.shape) for name, tensor in student_state.items()}
    given = {name: tuple(tensor.shape) for name, tensor in state.items()}
    differing = sorted(name for name in expected.keys() | given.keys() if expected.get(name) != given.get(name))
    if differing:
        name = differing[0]
        raise UserError(f"{teacher_class}: truncation cannot keep these blocks ({name}: teacher "
                        f"{given.get(name, 'none')}, student {expected.get(name, 'none')}): a config field ties the "
                        "block structure to the layer index and truncation does not renumber it; keep blocks whose "
                        "structure matches their new positions (--strategy custom --layers) or truncate a teacher "
                        "whose blocks share one structure")


def check_output_folder(output_dir, overwrite):
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        what = "a model" if is_trained_model_folder(output_dir) else "files"
        raise UserError(f"--output_dir {output_dir} already holds {what}: pass --overwrite_output_dir or choose "
                        "another folder")
    require_writable_folder(os.path.dirname(os.path.normpath(output_dir)) or ".", "--output_dir")


def save_student(student, tokenizer, record, output_dir, write_extras=None):
    """Write the folder under its staging name beside ``output_dir``, then rename it into place.

    ``write_extras(folder)`` adds further files to the folder before it is renamed."""
    output_dir = os.path.normpath(output_dir)
    staging = staging_path(output_dir)
    shutil.rmtree(staging, ignore_errors=True)
    with removed_on_failure(staging, os.path.dirname(staging) or ".",
                            lambda cause: f"--output_dir {output_dir}: could not write the student ({cause})"):
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(os.path.join(staging, TRUNCATION_FILE), record)
        if write_extras is not None:
            write_extras(staging)
    replace_folder(staging, output_dir)


@dataclasses.dataclass
class TruncationArguments:
    teacher_name_or_path: str = dataclasses.field(default=None, metadata={"help": "teacher: hub name or model folder"})
    output_dir: str = dataclasses.field(default=None, metadata={"help": "student folder to write"})
    strategy: str = dataclasses.field(default="distil",
                                      metadata={"help": "which layers to keep: " + ", ".join(STRATEGIES)})
    num_layers: int = dataclasses.field(default=None, metadata={"help": "student depth (default: half the teacher's)"})
    layers: str = dataclasses.field(default=None, metadata={"help": "with --strategy custom: e.g. 0,2,4,6,8,10"})
    tokenizer_name: str = dataclasses.field(default=None, metadata={"help": "tokenizer (default: the teacher's)"})
    overwrite_output_dir: bool = dataclasses.field(default=False, metadata={"help": "replace an existing folder"})
    importance: str = dataclasses.field(default="block_influence", metadata={
        "help": "with --strategy importance: block_influence, angular or perplexity"})
    calibration_split: str = dataclasses.field(default="train", metadata={
        "help": "with --strategy importance: the split of the data flags' text that scores the blocks"})
    calibration_tokens: int = dataclasses.field(default=131072, metadata={
        "help": "with --strategy importance: at most this many calibration tokens"})


def calibration_tokens(args, data_args, config, tokenizer, tokenizer_name):
    """The calibration split's blocks (``[n, block_size]``) from the common data flags."""
    from .data import check_vocabulary, choose_block_size, plan_tokens, require_planned_split, resolve_token_folder
    from .distributed import local_main_first
    from .importance import calibration_blocks
    from .tokenfiles import open_split, read_meta

    if not data_args.has_data():
        raise UserError("--strategy importance needs calibration text: give --train_file, --dataset_dir or "
                        "--dataset_name (with --calibration_split)")
    positions = next((getattr(config, name) for name in ("n_positions", "max_position_embeddings")
                      if getattr(config, name, None)), None)
    block_size = (choose_block_size(data_args.block_size, positions) if positions
                  else data_args.block_size or 128)
    plan = plan_tokens(data_args, tokenizer, tokenizer_name)  # the split is checked before any tokenization
    require_planned_split(plan.splits, args.calibration_split, data_args,
                          f"--calibration_split {args.calibration_split}",
                          f"give data with a {args.calibration_split} split or choose one of those")
    folder = resolve_token_folder(data_args, tokenizer, tokenizer_name, local_main_first, plan)
    check_vocabulary(read_meta(folder), config, str(folder))
    tokens = open_split(folder, args.calibration_split, "--calibration_split")
    return calibration_blocks(tokens, block_size, args.calibration_tokens,
                              f"--calibration_split {args.calibration_split} ({folder}/{args.calibration_split}.bin)")


def measured_layers(args, data_args, config, tokenizer, tokenizer_name):
    """``--strategy importance``: the kept layers, the scores' record and the teacher, measured on calibration
    text (each rank scores its share of the blocks)."""
    from .distributed import init_distributed
    from .importance import check_measure, measure_importance

    check_measure(args.importance)
    if args.layers:
        raise UserError("--layers goes with --strategy custom, not --strategy importance")
    n_keep = student_depth(config.num_hidden_layers, args.num_layers)
    _, _, device = init_distributed()
    blocks = calibration_tokens(args, data_args, config, tokenizer, tokenizer_name)
    teacher = load_causal_lm(config, args.teacher_name_or_path, "--teacher_name_or_path").to(device).eval()
    layers, record = measure_importance(teacher, blocks, args.importance, n_keep)
    return layers, record, teacher.cpu()


def write_importance_chart(record, layers, folder):
    from .importance import IMPORTANCE_FILE, plot_importance

    plot_importance(record, layers, os.path.join(folder, IMPORTANCE_FILE))


@entry_point
def main(argv=None):
    from .data import DataArguments
    from .distributed import distributed_world, end_process_group

    args, data_args = parse_dataclass_args((TruncationArguments, DataArguments), "truncate.py", argv)
    if not args.teacher_name_or_path or not args.output_dir:
        raise UserError("--teacher_name_or_path and --output_dir are required")
    check_output_folder(args.output_dir, args.overwrite_output_dir)
    config = load_config(None, args.teacher_name_or_path, model_flag="--teacher_name_or_path")
    check_truncatable(config, f"--teacher_name_or_path {args.teacher_name_or_path}")
    tokenizer_name = args.tokenizer_name or args.teacher_name_or_path
    tokenizer = load_tokenizer(tokenizer_name, "--tokenizer_name" if args.tokenizer_name else "--teacher_name_or_path")
    record = {"teacher": args.teacher_name_or_path, "teacher_n_layer": config.num_hidden_layers,
              "strategy": args.strategy}
    write_chart = None
    if args.strategy == "importance":
        layers, record["importance"], teacher = measured_layers(args, data_args, config, tokenizer, tokenizer_name)
        write_chart = functools.partial(write_importance_chart, record["importance"], layers)
    else:
        layers = select_layers(args.strategy, config.num_hidden_layers, args.num_layers, args.layers)
        teacher = load_causal_lm(config, args.teacher_name_or_path, "--teacher_name_or_path")
    record["layers"] = layers
    rank = distributed_world()[0]
    if rank == 0:
        save_student(truncate_model(teacher, layers), tokenizer, record, args.output_dir, write_chart)
        print(f"{args.output_dir}: {len(layers)} of {config.num_hidden_layers} layers ({args.strategy}): "
              f"{','.join(map(str, layers))}")
    end_process_group()
