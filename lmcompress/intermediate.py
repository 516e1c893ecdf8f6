"""Intermediate-layer distillation: PKD hidden states of mapped layers and MiniLM last-layer relations.

The models keep SDPA for their own forward. Their last attention layer runs through a registered attention function
that records its queries, keys and values and then calls SDPA; the attention and value-relation distributions are
recomputed from those, a chunk of query positions at a time, so no heads×T×T map of the whole batch is held.
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import UserError
from .jsonio import read_json
from .truncation import block_output, decoder_blocks

CAPTURE_IMPLEMENTATION = "lmcompress_capture"
CAPTURE_ATTRIBUTE = "lmcompress_captured"
QUERY_CHUNK = 128


def _capturing_sdpa(module, query, key, value, attention_mask, **kwargs):
    store = getattr(module, CAPTURE_ATTRIBUTE, None)
    if store is not None:
        # No scaling means SDPA's default; the window is the one the mask builder applied (None: full causal).
        scaling = kwargs.get("scaling")
        store.update(query=query, key=key, value=value, sliding_window=kwargs.get("sliding_window"),
                     scaling=query.shape[-1] ** -0.5 if scaling is None else scaling)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capturing_sdpa)
AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


# ---- layer map ----

def even_map(n_student, n_teacher):
    """Student block i ↔ teacher block round(i·(n_t − 1)/(n_s − 1)): first to first, last to last."""
    if n_student == 1:
        return [(0, n_teacher - 1)]
    return [(i, round(i * (n_teacher - 1) / (n_student - 1))) for i in range(n_student)]


def parse_layer_map(text, n_student, n_teacher):
    """``--layer_map 0:0,1:2``: student block : teacher block pairs."""
    try:
        pairs = [tuple(int(side) for side in item.split(":")) for item in text.replace(" ", "").split(",")]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError
    except ValueError as err:
        raise UserError(f"--layer_map {text}: give student:teacher block pairs, e.g. 0:0,1:2,2:5") from err
    for student, teacher in pairs:
        if not 0 <= student < n_student:
            raise UserError(f"--layer_map {text}: the student has no block {student} (it has blocks 0 to "
                            f"{n_student - 1})")
        if not 0 <= teacher < n_teacher:
            raise UserError(f"--layer_map {text}: the teacher has no block {teacher} (it has blocks 0 to "
                            f"{n_teacher - 1})")
    return pairs


def resolve_layer_map(text, student_folder, n_student, n_teacher, truncation_file):
    """The map and where it came from: --layer_map, else the student's truncation record, else evenly spread."""
    if text:
        return parse_layer_map(text, n_student, n_teacher), "--layer_map"
    record = os.path.join(student_folder or "", truncation_file)
    if student_folder and os.path.isfile(record):
        layers = read_json(record)["layers"]
        return parse_layer_map(",".join(f"{i}:{t}" for i, t in enumerate(layers)), n_student, n_teacher), record
    return even_map(n_student, n_teacher), "evenly spread"


# ---- block outputs ----

class BlockOutputs:
    """Forward hooks that keep the outputs of chosen transformer blocks during one forward."""

    def __init__(self, blocks, indices):
        self.outputs = {}
        self.handles = [blocks[i].register_forward_hook(self._keeper(i)) for i in sorted(set(indices))]

    def _keeper(self, index):
        def keep(module, inputs, output):
            self.outputs[index] = block_output(output)
        return keep


def hidden_loss(student_hidden, teacher_hidden, layer_map, mask, n_tokens):
    """Σ over mapped pairs of ‖h_s/|h_s| − h_t/|h_t|‖², averaged over real positions."""
    total = 0
    for s, t in layer_map:
        distance = (F.normalize(student_hidden[s].double(), dim=-1) -
                    F.normalize(teacher_hidden[t].double(), dim=-1)).pow(2).sum(-1)
        total = total + distance[mask].sum()
    count = mask.sum() if n_tokens is None else n_tokens
    return (total / torch.as_tensor(count, dtype=torch.float64, device=mask.device).clamp_min(1)).float()


# ---- last-layer relations ----

def relation_heads(tensor, n_heads, n_relation_heads):
    """(B, H, T, d) → (B, R, T, H·d/R); key/value heads of grouped-query attention expanded first."""
    if tensor.shape[1] != n_heads:
        tensor = tensor.repeat_interleave(n_heads // tensor.shape[1], dim=1)
    if n_relation_heads is None or n_relation_heads == n_heads:
        return tensor
    batch, _, length, _ = tensor.shape
    merged = tensor.transpose(1, 2).reshape(batch, length, -1)
    return merged.reshape(batch, length, n_relation_heads, -1).transpose(1, 2)


def _allowed(start, stop, real, length, window=None):
    """Causal and real keys for queries start..stop, the last ``window`` of them when given (transformers' sliding
    window: q − window < k ≤ q); a query always sees itself so no row is empty."""
    queries = torch.arange(start, stop, device=real.device)[:, None]
    keys = torch.arange(length, device=real.device)[None, :]
    visible = keys <= queries
    if window is not None:
        visible &= keys > queries - window
    return (visible & real[:, None, None, :]) | (keys == queries)


def _chunk_kl(t_query, t_key, s_query, s_key, t_scale, s_scale, allowed, query_real):
    t_logp = (t_query @ t_key.transpose(-1, -2) * t_scale).masked_fill(~allowed, float("-inf")).log_softmax(-1)
    s_logp = (s_query @ s_key.transpose(-1, -2) * s_scale).masked_fill(~allowed, float("-inf")).log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).masked_fill(~allowed, 0).sum(-1)  # (B, H, c)
    return (kl * query_real[:, None, :]).sum()


def relation_kl(teacher, student, real, query_mask, t_scale, s_scale, n_tokens, chunk=None, window=None):
    """Σ_heads Σ_real queries KL(teacher ‖ student) of causal softmax(a·bᵀ·scale), over heads, per real token.

    ``teacher``/``student`` are (a, b) pairs of (B, R, T, d) tensors with the same R; ``real`` marks real keys,
    ``query_mask`` the positions that count (those of the other loss terms); ``window`` limits each query to its
    last ``window`` keys (a sliding-window layer); ``chunk`` query positions at a time (default ``QUERY_CHUNK``).
    """
    (t_a, t_b), (s_a, s_b) = teacher, student
    length, heads = t_a.shape[2], t_a.shape[1]
    chunk = chunk or QUERY_CHUNK
    total = 0
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        allowed = _allowed(start, stop, real, length, window)
        args = (t_a[:, :, start:stop], t_b, s_a[:, :, start:stop], s_b, t_scale, s_scale, allowed,
                query_mask[:, start:stop].to(s_a.dtype))
        total = total + (checkpoint(_chunk_kl, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else _chunk_kl(*args))
    count = query_mask.sum() if n_tokens is None else n_tokens
    return total / (heads * torch.as_tensor(count, dtype=total.dtype, device=total.device).clamp_min(1))


def common_relation_heads(teacher_layout, student_layout, n_relation_heads):
    """The relation head count for ``(heads, head size)`` layouts: the models' own when they agree, else
    ``--num_relation_heads``, which must divide both models' heads × head size."""
    (t_heads, t_size), (s_heads, s_size) = teacher_layout, student_layout
    if n_relation_heads is None:
        if t_heads != s_heads:
            raise UserError(f"the teacher's last layer has {t_heads} attention heads and the student's {s_heads}: "
                            f"give --num_relation_heads (dividing both {t_heads * t_size} and {s_heads * s_size}) "
                            "to regroup them")
        return t_heads
    for model, width in (("teacher", t_heads * t_size), ("student", s_heads * s_size)):
        if n_relation_heads <= 0 or width % n_relation_heads:
            raise UserError(f"--num_relation_heads {n_relation_heads}: must be above zero and divide the "
                            f"{model}'s {width} attention channels (heads × head size)")
    return n_relation_heads


def config_heads(config):
    """``(heads, head size)`` of a model's attention, from its config."""
    heads = config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def common_window(teacher_qkv, student_qkv, length):
    """The sliding window both last layers attend over at this length (None: full causal), or a refusal: the two
    distributions must share their keys for the KL to be finite."""
    t_window, s_window = (None if qkv["sliding_window"] is None or qkv["sliding_window"] >= length
                          else qkv["sliding_window"] for qkv in (teacher_qkv, student_qkv))
    if t_window != s_window:
        def described(window):
            return "all earlier positions" if window is None else f"a sliding window of {window} positions"
        raise UserError(f"--alpha_att/--alpha_val: the teacher's last layer attends over {described(t_window)} and "
                        f"the student's over {described(s_window)} at --block_size {length}: the relations need "
                        "the same keys; keep the teacher's last layer in the student or set --alpha_att 0 "
                        "--alpha_val 0")
    return t_window


def relation_losses(student_qkv, teacher_qkv, real, query_mask, n_tokens, n_relation_heads, want_att, want_val):
    """MiniLM's last-layer attention-distribution and value-relation KL terms, by log name.

    Both run over the keys the layer's attention sees (causal, within its sliding window if it has one). Regrouped
    into relation heads of size d_r (MiniLMv2), attention scores take the model's own scale times √(d / d_r): 1/√d_r
    for the usual 1/√d, and right for models that scale their queries before the attention call (OPT).
    """
    s_heads, t_heads = student_qkv["query"].shape[1], teacher_qkv["query"].shape[1]
    common = common_relation_heads((t_heads, teacher_qkv["query"].shape[-1]),
                                   (s_heads, student_qkv["query"].shape[-1]), n_relation_heads)
    window = common_window(teacher_qkv, student_qkv, real.shape[-1])

    def heads(qkv, name, n_heads):
        return relation_heads(qkv[name].double() if qkv[name].dtype == torch.float64 else qkv[name].float(),
                              n_heads, common)

    terms = {}
    if want_att:
        t_q, t_k = heads(teacher_qkv, "query", t_heads), heads(teacher_qkv, "key", t_heads)
        s_q, s_k = heads(student_qkv, "query", s_heads), heads(student_qkv, "key", s_heads)
        t_scale = teacher_qkv["scaling"] * (teacher_qkv["query"].shape[-1] / t_q.shape[-1]) ** 0.5
        s_scale = student_qkv["scaling"] * (student_qkv["query"].shape[-1] / s_q.shape[-1]) ** 0.5
        terms["loss_att"] = relation_kl((t_q, t_k), (s_q, s_k), real, query_mask, t_scale, s_scale, n_tokens,
                                        window=window)
    if want_val:
        t_v, s_v = heads(teacher_qkv, "value", t_heads), heads(student_qkv, "value", s_heads)
        terms["loss_val"] = relation_kl((t_v, t_v), (s_v, s_v), real, query_mask, t_v.shape[-1] ** -0.5,
                                        s_v.shape[-1] ** -0.5, n_tokens, window=window)
    return terms


# ---- model plumbing ----

def attention_module(block):
    for name in ("attn", "self_attn", "attention", "self_attention"):
        if hasattr(block, name):
            return getattr(block, name)
    raise UserError(f"{type(block).__name__}: its attention cannot be captured; set --alpha_att 0 --alpha_val 0")


def enable_capture(model, flag="--alpha_att/--alpha_val"):
    """Route the model's attention through the recording SDPA and record its last layer; returns the store."""
    if getattr(model.config, "attn_logit_softcapping", None):
        raise UserError(f"{flag}: {type(model).__name__} soft-caps its attention logits, which SDPA and the "
                        "recomputed distributions do not; set --alpha_att 0 --alpha_val 0")
    try:
        model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    except (ValueError, AttributeError) as err:
        raise UserError(f"{flag}: the attention of {type(model).__name__} cannot be captured ({err}); set "
                        "--alpha_att 0 --alpha_val 0") from err
    # Models whose attention does not go through AttentionInterface keep their own and only log a warning.
    if model.config._attn_implementation != CAPTURE_IMPLEMENTATION:
        raise UserError(f"{flag}: {type(model).__name__} does not call its attention through transformers' "
                        "AttentionInterface, so its attention cannot be captured; set --alpha_att 0 --alpha_val 0")
    store = {}
    setattr(attention_module(decoder_blocks(model)[-1]), CAPTURE_ATTRIBUTE, store)
    return store


class Taps:
    """What the intermediate terms read from the student's and the teacher's forward: mapped block outputs and
    the last layer's queries, keys and values."""

    def __init__(self, args, student, teacher, student_folder, truncation_file):
        self.active = bool(args.alpha_hidden or args.alpha_att or args.alpha_val)
        args.resolved_layer_map = None
        if args.alpha_hidden:
            s_blocks, t_blocks = decoder_blocks(student), decoder_blocks(teacher)
            layer_map, source = resolve_layer_map(args.layer_map, student_folder, len(s_blocks), len(t_blocks),
                                                  truncation_file)
            if source == "evenly spread" and int(os.environ.get("RANK", "0")) == 0:
                print(f"distiller.py: note: the student has no {truncation_file} and no --layer_map was given: "
                      f"--alpha_hidden uses the evenly spread map {','.join(f'{s}:{t}' for s, t in layer_map)}",
                      file=sys.stderr, flush=True)
            args.resolved_layer_map = layer_map
            self.student_blocks = BlockOutputs(s_blocks, [s for s, _ in layer_map])
            self.teacher_blocks = BlockOutputs(t_blocks, [t for _, t in layer_map])
        if args.alpha_att or args.alpha_val:
            self.student_qkv, self.teacher_qkv = enable_capture(student), enable_capture(teacher)

    def terms(self, args, forward_inputs, query_mask, n_tokens):
        """The intermediate terms of the forwards just run, by log name."""
        terms = {}
        if args.alpha_hidden:
            terms["loss_hidden"] = hidden_loss(self.student_blocks.outputs, self.teacher_blocks.outputs,
                                               args.resolved_layer_map, query_mask, n_tokens)
        if args.alpha_att or args.alpha_val:
            if not self.student_qkv or not self.teacher_qkv:
                raise UserError("--alpha_att/--alpha_val: the last layer's queries, keys and values were not "
                                "captured (ZeRO-3 or a fused attention kernel?); set --alpha_att 0 --alpha_val 0")
            real = forward_inputs.get("attention_mask", torch.ones_like(query_mask)).bool()
            terms.update(relation_losses(self.student_qkv, self.teacher_qkv, real, query_mask, n_tokens,
                                         args.num_relation_heads, args.alpha_att, args.alpha_val))
        return terms
