"""distiller.py: distil a frozen teacher into a student with the HuggingFace Trainer (a compute_loss override).

Loss = alpha_ce·T²·D(teacher, student at T) + alpha_clm·LM + alpha_cos·(1 − cos of last hidden states)
       + alpha_mse·MSE of logits,
every term averaged over the positions that predict a real next token (``labels[t + 1] != -100``). Batches
carry these targets as ``shift_labels``, which the Trainer counts for ``num_items_in_batch`` over the
micro-batches of one optimiser step and over ranks. Dividing every micro-batch's sums by that count makes k
accumulated micro-batches, or n ranks, give the loss and gradient of one batch k (or n) times larger.
"""
import dataclasses
import os
import sys

import torch
from transformers import default_data_collator

from . import deepspeed_support, intermediate
from .data import DataArguments
from .distributed import all_reduce_sum
from .errors import UserError, entry_point
from .jsonio import read_json, write_json
from .losses import DIVERGENCES, IGNORE_INDEX, cosine_loss, kd_loss, lm_loss, mse_loss
from .models import load_causal_lm, load_config, position_embeddings
from .training import (LMTrainer, ProjectTrainingArguments, autocast_dtype, parse_training_flags, prepare_data,
                       prepare_run, train_and_evaluate)
from .throughput import count_parameters, flops_per_token
from .truncation import TRUNCATION_FILE
from .vocab import load_tokenizer, tokenizer_fingerprint

DISTILLATION_FILE = "distillation.json"
# The original distiller's flags that map one to one onto this one's, and those that have no meaning here.
LEGACY_RENAMES = {"--n_epoch": "--num_train_epochs", "--batch_size": "--per_device_train_batch_size",
                  "--dump_path": "--output_dir", "--warmup_prop": "--warmup_ratio",
                  "--teacher_name": "--teacher_name_or_path", "--force": "--overwrite_output_dir"}
LEGACY_IGNORED = {"--student_type": "the model type is read from the config",
                  "--teacher_type": "the model type is read from the config",
                  "--n_gpu": "the launcher sets the processes (NPROC_PER_NODE, torchrun)",
                  "--fp16_opt_level": "mixed precision is native torch.amp (--fp16 or --bf16)"}


def translate_legacy_flags(argv):
    """Rewrite the original distiller's flag names; return the new argv and a note per translated flag."""
    translated, notes = [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        flag, has_inline_value, value = arg.partition("=")
        if flag in LEGACY_IGNORED:
            if not has_inline_value and args and not args[0].startswith("--"):
                value = args.pop(0)
            notes.append(f"{flag}{' ' + value if value else ''}: ignored, {LEGACY_IGNORED[flag]}")
        elif flag in LEGACY_RENAMES:
            new_flag = LEGACY_RENAMES[flag]
            translated.append(f"{new_flag}={value}" if has_inline_value else new_flag)
            notes.append(f"{flag} is now {new_flag}")
        else:
            translated.append(arg)
    return translated, notes


def _flag(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class DistillationArguments:
    teacher_name_or_path: str = _flag(None, "teacher: hub name or model folder")
    student_name_or_path: str = _flag(None, "student folder, e.g. from truncate.py")
    student_config: str = _flag(None, "student config JSON: a new student")
    student_pretrained_weights: str = _flag(None, "with --student_config: a state dict (.bin, .pth, .safetensors) "
                                                  "or model folder")
    tokenizer_name: str = _flag(None, "tokenizer (default: the student's, else the teacher's)")
    temperature: float = _flag(2.0, "softmax temperature of the KD term")
    alpha_ce: float = _flag(5.0, "weight of T²·divergence(teacher, student)")
    alpha_clm: float = _flag(2.0, "weight of the student's LM loss")
    alpha_cos: float = _flag(1.0, "weight of 1 − cosine of the last hidden states")
    alpha_mse: float = _flag(0.0, "weight of the MSE of logits")
    alpha_hidden: float = _flag(0.0, "weight of the PKD hidden-state loss over the mapped blocks")
    alpha_att: float = _flag(0.0, "weight of MiniLM's last-layer attention-distribution KL")
    alpha_val: float = _flag(0.0, "weight of MiniLM's last-layer value-relation KL")
    layer_map: str = _flag(None, "student:teacher block pairs for --alpha_hidden, e.g. 0:0,1:2 (default: the "
                                 "student's truncation.json, else evenly spread)")
    num_relation_heads: int = _flag(None, "regroup the attention/value relations into this many heads (needed "
                                          "when teacher and student head counts differ)")
    divergence: str = _flag("forward_kl", "KD divergence: " + ", ".join(DIVERGENCES))
    jsd_beta: float = _flag(0.5, "with --divergence jsd: the teacher's share of the mixture, in (0, 1)")
    freeze_pos_embs: bool = _flag(False, "do not train the position embeddings")

    def __post_init__(self):
        if not self.teacher_name_or_path:
            raise UserError("--teacher_name_or_path is required")
        if bool(self.student_name_or_path) == bool(self.student_config):
            raise UserError("give --student_name_or_path (a model folder) or --student_config (a config JSON), "
                            "exactly one")
        if self.student_pretrained_weights and not self.student_config:
            raise UserError("--student_pretrained_weights goes with --student_config")
        for name, value in self.alphas().items():
            if value < 0:
                raise UserError(f"--{name} {value}: the loss weights must be zero or positive")
        if not any(self.alphas().values()):
            raise UserError("all loss weights are zero: set at least one of "
                            + ", ".join(f"--{name}" for name in self.alphas()) + " above zero")
        if self.layer_map and not self.alpha_hidden:
            raise UserError(f"--layer_map {self.layer_map}: only --alpha_hidden uses a layer map; set --alpha_hidden "
                            "above zero or leave --layer_map out")
        if self.num_relation_heads is not None and not (self.alpha_att or self.alpha_val):
            raise UserError(f"--num_relation_heads {self.num_relation_heads}: only --alpha_att and --alpha_val use "
                            "relation heads; set one of them above zero or leave --num_relation_heads out")
        if not self.temperature > 0:
            raise UserError(f"--temperature {self.temperature}: must be above zero")
        if self.divergence not in DIVERGENCES:
            raise UserError(f"--divergence {self.divergence}: choose from {', '.join(DIVERGENCES)}")
        if not 0 < self.jsd_beta < 1:
            raise UserError(f"--jsd_beta {self.jsd_beta}: must be between 0 and 1 (exclusive)")

    def alphas(self):
        return {"alpha_ce": self.alpha_ce, "alpha_clm": self.alpha_clm, "alpha_cos": self.alpha_cos,
                "alpha_mse": self.alpha_mse, "alpha_hidden": self.alpha_hidden, "alpha_att": self.alpha_att,
                "alpha_val": self.alpha_val}

    def uses_teacher(self):
        return any((self.alpha_ce, self.alpha_cos, self.alpha_mse, self.alpha_hidden, self.alpha_att,
                    self.alpha_val))


def loss_terms(args, student, teacher, targets, n_tokens):
    """The loss terms, unweighted, by log name: those whose weight is above zero."""
    mask = targets != IGNORE_INDEX
    terms = {}
    if args.alpha_ce:
        terms["loss_ce"] = kd_loss(student.logits, teacher.logits, mask, args.temperature, args.divergence,
                                   args.jsd_beta, n_tokens)
    if args.alpha_clm:
        terms["loss_clm"] = lm_loss(student.logits, targets, n_tokens)
    if args.alpha_cos:
        terms["loss_cos"] = cosine_loss(student.hidden_states[-1], teacher.hidden_states[-1], mask, n_tokens)
    if args.alpha_mse:
        terms["loss_mse"] = mse_loss(student.logits, teacher.logits, mask, n_tokens)
    return terms


WEIGHTS = {"loss_ce": "alpha_ce", "loss_clm": "alpha_clm", "loss_cos": "alpha_cos", "loss_mse": "alpha_mse",
           "loss_hidden": "alpha_hidden", "loss_att": "alpha_att", "loss_val": "alpha_val"}


def weighted_sum(args, terms):
    return sum(getattr(args, WEIGHTS[name]) * value for name, value in terms.items())


class DistillationTrainer(LMTrainer):
    """LMTrainer whose training loss is the distillation loss; evaluation stays the student's perplexity."""

    def __init__(self, *args, teacher, distillation_args, **kwargs):
        super().__init__(*args, **kwargs)
        self.distillation_args = distillation_args
        self.teacher = deepspeed_support.frozen_teacher(teacher, self.args, autocast_dtype(self.args))
        # Each trained token also costs the teacher's forward pass (counted once the teacher is placed).
        self.throughput.extra_flops = lambda: flops_per_token(teacher.config, count_parameters(teacher),
                                                              self.block_size, training=False)
        self._term_sums, self._term_tokens = {}, 0
        self.taps = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.distillation_args
        targets = inputs["shift_labels"]
        forward_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask") if key in inputs}
        student = model(**forward_inputs, output_hidden_states=bool(args.alpha_cos))
        teacher = self.teacher_outputs(forward_inputs) if args.uses_teacher() else None
        n_tokens, scale = self.normaliser(targets, num_items_in_batch)
        terms = loss_terms(args, student, teacher, targets, n_tokens)
        if self.taps is not None:
            terms.update(self.taps.terms(args, forward_inputs, targets != IGNORE_INDEX, n_tokens))
        loss = weighted_sum(args, terms)
        if model.training:
            self.record_terms(terms, n_tokens, targets)
        loss = loss * scale
        return (loss, student) if return_outputs else loss

    @torch.no_grad()
    def teacher_outputs(self, forward_inputs):
        return self.teacher(**forward_inputs, output_hidden_states=bool(self.distillation_args.alpha_cos))

    def record_terms(self, terms, n_tokens, targets):
        for name, value in terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach().double() * n_tokens
        self._term_tokens = self._term_tokens + (targets != IGNORE_INDEX).sum()

    def log(self, logs, start_time=None):
        """Add each loss term, token-averaged over the steps since the last log and over all ranks."""
        if "loss" in logs and self._term_sums:
            names = sorted(self._term_sums)
            totals = torch.stack([torch.as_tensor(self._term_sums[name], dtype=torch.float64, device=self.args.device)
                                  for name in names] +
                                 [torch.as_tensor(self._term_tokens, dtype=torch.float64, device=self.args.device)])
            all_reduce_sum(totals)
            for name, total in zip(names, totals[:-1]):
                logs[name] = (total / totals[-1].clamp_min(1)).item()
            self._term_sums, self._term_tokens = {}, 0
        super().log(logs, start_time)


def read_state_dict(path, flag="--student_pretrained_weights"):
    """A state dict from a .safetensors / .bin / .pth file, or from the weights file of a model folder."""
    if os.path.isdir(path):
        candidates = [os.path.join(path, name) for name in ("model.safetensors", "pytorch_model.bin")]
        found = [candidate for candidate in candidates if os.path.isfile(candidate)]
        if not found:
            raise UserError(f"{flag} {path}: the folder holds no model.safetensors or pytorch_model.bin")
        path = found[0]
    elif not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many kinds on a bad file
        raise UserError(f"{flag} {path}: cannot read a state dict: {' '.join(str(err).split())[:200]}") from err
    if not isinstance(state, dict):
        raise UserError(f"{flag} {path}: holds a {type(state).__name__}, not a state dict")
    return state


def load_student_weights(model, state, flag="--student_pretrained_weights"):
    """Load ``state`` into ``model`` after checking every name and shape against the config."""
    expected = model.state_dict()
    # Old transformers stored the causal-mask buffers; they are not weights.
    state = {name: tensor for name, tensor in state.items() if not name.endswith((".attn.bias", ".attn.masked_bias"))}
    for name, tensor in state.items():
        if name not in expected:
            raise UserError(f"{flag}: unexpected weight {name}: the weights are not of a --student_config model")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"{flag}: {name} has shape {tuple(tensor.shape)} but --student_config needs "
                            f"{tuple(expected[name].shape)}")
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state) - tied)
    if missing:
        raise UserError(f"{flag}: {len(missing)} weights missing, e.g. {missing[0]}")
    model.load_state_dict(state, strict=False)
    return model


def check_compatible(args, teacher_config, student_config, teacher_tokenizer, student_tokenizer):
    """The student learns the teacher's distribution token by token: same vocabulary, same token ids."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise UserError(f"the teacher's vocabulary has {teacher_config.vocab_size} entries and the student's "
                        f"{student_config.vocab_size}: distillation needs the same vocabulary")
    if tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(student_tokenizer):
        raise UserError(f"the teacher's tokenizer ({args.teacher_name_or_path}) differs from the student's "
                        f"({student_tokenizer.name_or_path}): distillation needs the same tokenizer")
    if args.alpha_cos and teacher_config.hidden_size != student_config.hidden_size:
        raise UserError(f"--alpha_cos {args.alpha_cos}: the teacher's hidden size {teacher_config.hidden_size} differs "
                        f"from the student's {student_config.hidden_size}; the cosine term needs equal sizes: set "
                        "--alpha_cos 0")


def check_intermediate_shapes(args, teacher_config, student_config):
    """The intermediate terms compare the two models' hidden states and attention heads as they are."""
    if args.alpha_hidden and teacher_config.hidden_size != student_config.hidden_size:
        raise UserError(f"--alpha_hidden {args.alpha_hidden}: the teacher's hidden size {teacher_config.hidden_size} "
                        f"differs from the student's {student_config.hidden_size} and there is no projection: set "
                        "--alpha_hidden 0")
    if args.alpha_att or args.alpha_val:
        intermediate.common_relation_heads(intermediate.config_heads(teacher_config),
                                           intermediate.config_heads(student_config), args.num_relation_heads)


def load_student(args, config):
    if args.student_name_or_path:
        return load_causal_lm(config, args.student_name_or_path, "--student_name_or_path")
    model = load_causal_lm(config)
    if args.student_pretrained_weights:
        load_student_weights(model, read_state_dict(args.student_pretrained_weights))
    return model


def freeze_position_embeddings(model):
    embeddings = position_embeddings(model)
    if embeddings is None:
        print(f"distiller.py: note: --freeze_pos_embs: {type(model).__name__} has no learned position embeddings; "
              "nothing to freeze", file=sys.stderr)
        return
    embeddings.weight.requires_grad_(False)


def distillation_record(args):
    record = {"teacher": args.teacher_name_or_path, "student": args.student_name_or_path or args.student_config,
              "student_pretrained_weights": args.student_pretrained_weights, "temperature": args.temperature,
              "divergence": args.divergence, **args.alphas(), "freeze_pos_embs": args.freeze_pos_embs}
    if args.alpha_hidden:
        record["layer_map"] = [list(pair) for pair in args.resolved_layer_map]
    if args.alpha_att or args.alpha_val:
        record["num_relation_heads"] = args.num_relation_heads
    if args.divergence == "jsd":
        record["jsd_beta"] = args.jsd_beta
    truncation = os.path.join(args.student_name_or_path or "", TRUNCATION_FILE)
    if args.student_name_or_path and os.path.isfile(truncation):
        record["student_truncation"] = read_json(truncation)
    return record


def build_trainer(argv=None):
    """Parse distiller.py's flags, check and load everything; returns ``(trainer, checkpoint_to_resume)``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, notes = translate_legacy_flags(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"distiller.py: note: {note}", file=sys.stderr)
    args, data_args, training_args = parse_training_flags(
        (DistillationArguments, DataArguments, ProjectTrainingArguments), "distiller.py", argv)
    resume = prepare_run(training_args)
    teacher_config = load_config(None, args.teacher_name_or_path, model_flag="--teacher_name_or_path")
    student_config = load_config(args.student_config, args.student_name_or_path, "--student_config",
                                 "--student_name_or_path")
    tokenizer_name = args.tokenizer_name or args.student_name_or_path or args.teacher_name_or_path
    tokenizer_flag = ("--tokenizer_name" if args.tokenizer_name else
                      "--student_name_or_path" if args.student_name_or_path else "--teacher_name_or_path")
    tokenizer = load_tokenizer(tokenizer_name, tokenizer_flag)
    teacher_tokenizer = (tokenizer if tokenizer_name == args.teacher_name_or_path else
                         load_tokenizer(args.teacher_name_or_path, "--teacher_name_or_path"))
    check_compatible(args, teacher_config, student_config, teacher_tokenizer, tokenizer)
    check_intermediate_shapes(args, teacher_config, student_config)
    student = load_student(args, student_config)
    if args.freeze_pos_embs:
        freeze_position_embeddings(student)
    teacher = load_causal_lm(teacher_config, args.teacher_name_or_path, "--teacher_name_or_path")
    taps = intermediate.Taps(args, student, teacher, args.student_name_or_path, TRUNCATION_FILE)  # refuses a bad --layer_map
    data = prepare_data(data_args, tokenizer, tokenizer_name, student_config, training_args.eval_strategy.value)
    trainer = DistillationTrainer(model=student, args=training_args, train_dataset=data.train_dataset,
                                  data_collator=default_data_collator, processing_class=tokenizer,
                                  eval_tokens=data.eval_tokens, block_size=data.block_size,
                                  run_info={"block_size": data.block_size, "data": data.folder}, teacher=teacher,
                                  distillation_args=args)
    trainer.taps = taps if taps.active else None
    return trainer, resume


@entry_point
def main(argv=None):
    trainer, resume = build_trainer(argv)
    if trainer.is_world_process_zero():
        output_dir = trainer.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        record = distillation_record(trainer.distillation_args)
        write_json(os.path.join(output_dir, DISTILLATION_FILE), record)
        # The distilled student keeps its block map, so distilling it again (while fine-tuning) maps the same way.
        if "student_truncation" in record:
            write_json(os.path.join(output_dir, TRUNCATION_FILE), record["student_truncation"])
    train_and_evaluate(trainer, resume)
