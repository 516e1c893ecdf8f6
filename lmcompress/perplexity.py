"""Perplexity of a causal LM over a token stream, with a stride.

Windows of ``block_size`` tokens start every ``stride`` tokens. Each token after the first is scored exactly
once, in the first window that covers it beyond the tokens already scored, so it sees the longest context
the stride allows. ``stride == block_size`` gives non-overlapping blocks whose first token is not scored
(HuggingFace ``run_clm.py`` and the paper); a smaller stride is the sliding window of HuggingFace's
perplexity guide. The loss is token-weighted: total NLL over all scored tokens / their number.
"""
import math

import numpy as np
import torch

from .distributed import all_reduce_sum
from .errors import UserError
from .losses import IGNORE_INDEX, summed_nll
from .models import plain_output_head


def check_stride(stride, block_size):
    if not 0 < stride <= block_size:
        raise UserError(f"--stride {stride}: must be between 1 and the block size ({block_size})")


def window_spans(n_tokens, block_size, stride):
    """``(begin, end, first_scored)`` per window: tokens ``[begin, end)`` go in, ``[first_scored, end)`` count."""
    check_stride(stride, block_size)
    spans, begin, previous_end = [], 0, 0
    while True:
        end = min(begin + block_size, n_tokens)
        first_scored = max(previous_end, begin + 1)
        if end > first_scored:
            spans.append((begin, end, first_scored))
        previous_end = end
        if end >= n_tokens:
            return spans
        begin += stride


def make_batch(tokens, spans, pad_id=0):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE_INDEX where not scored)."""
    length = max(end - begin for begin, end, _ in spans)
    input_ids = torch.full((len(spans), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(spans), length), dtype=torch.long)
    labels = torch.full((len(spans), length), IGNORE_INDEX, dtype=torch.long)
    for row, (begin, end, first_scored) in enumerate(spans):
        window = torch.from_numpy(np.asarray(tokens[begin:end], dtype=np.int64))
        input_ids[row, : end - begin] = window
        attention_mask[row, : end - begin] = 1
        labels[row, first_scored - begin : end - begin] = window[first_scored - begin :]
    return input_ids, attention_mask, labels


def scored_positions(spans, length):
    """Host-side flat indices of the scored predictions in a batch's ``rows × (length - 1)`` next-token outputs."""
    return torch.cat([torch.arange(row * (length - 1) + first_scored - begin - 1, row * (length - 1) + end - begin - 1)
                      for row, (begin, end, first_scored) in enumerate(spans)])


def batch_nll(model, input_ids, attention_mask, labels, whole_model=False, positions=None):
    """Σ next-token NLL of a batch over the predictions whose label is set, and their number.

    Only the scored positions go through the output layer, chunk by chunk (``losses.summed_nll``). ``positions``
    (``scored_positions``, built on the host) spares the device a mask count that would wait for the forward pass.
    ``whole_model``: one plain forward with full logits (ZeRO-3: a fixed number of parameter gathers).
    """
    head = plain_output_head(model)
    if whole_model or model.base_model is model or head is None:
        states, weight = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits, None
    else:
        states = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        weight = head.weight
    targets = labels[:, 1:].reshape(-1)
    states = states[:, :-1].reshape(-1, states.shape[-1])
    if positions is None:
        positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return summed_nll(states.index_select(0, positions), targets.index_select(0, positions), weight), positions.numel()


def perplexity_from(nll_sum, n_scored):
    loss = nll_sum / n_scored
    return loss, math.exp(loss) if loss < 700 else float("inf")


@torch.no_grad()
def stream_nll(model, tokens, block_size, stride, batch_size, device, autocast_dtype=None, rank=0, world_size=1,
               progress=False, lockstep=False):
    """Sum of NLL and number of scored tokens for this rank's share of the windows (window i → rank i % world).

    ``lockstep`` (ZeRO-3, whose every forward gathers parameters from all ranks): every rank runs as many
    whole-model forward passes as rank 0, which has the most windows; a rank that has run out scores its
    last window again and drops the result.
    """
    from tqdm.auto import tqdm

    all_spans = window_spans(len(tokens), block_size, stride)
    spans = all_spans[rank::world_size]
    n_batches = math.ceil(len(all_spans[::world_size] if lockstep else spans) / batch_size)
    was_training = model.training
    model.eval()
    nll_sum, n_scored = 0.0, 0
    for start in tqdm(range(0, n_batches * batch_size, batch_size), desc="perplexity", unit="tok",
                      unit_scale=batch_size * block_size, disable=not progress or None):
        batch = spans[start : start + batch_size]
        fed = batch or (spans or all_spans)[-1:]
        input_ids, attention_mask, labels = (t.to(device, non_blocking=True) for t in make_batch(tokens, fed))
        positions = scored_positions(fed, input_ids.shape[1]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            batch_sum, batch_count = batch_nll(model, input_ids, attention_mask, labels, whole_model=lockstep,
                                               positions=positions)
        if batch:
            nll_sum += batch_sum
            n_scored += batch_count
    model.train(was_training)
    return torch.as_tensor(nll_sum, dtype=torch.float64).item(), n_scored


def reduce_sums(nll_sum, n_scored, device):
    """Add the per-rank sums across processes (no-op without torch.distributed)."""
    sums = all_reduce_sum(torch.tensor([nll_sum, float(n_scored)], dtype=torch.float64, device=device))
    return sums[0].item(), int(sums[1].item())


def word_perplexity(loss, n_tokens, n_words):
    """exp(total NLL / words), the NLL of the whole text estimated as ``loss`` per token."""
    if not n_words:
        return None
    return math.exp(min(loss * n_tokens / n_words, 700))
