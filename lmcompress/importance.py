"""Block importance on calibration text, for ``truncate.py --strategy importance``.

Three measures, each a score per teacher block (higher: more important):
- ``block_influence``: 1 − mean cosine between a block's input and output hidden states (ShortGPT).
- ``angular``: for removing a contiguous run of n blocks, arccos(cosine)/π between the run's input and output
  (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"); the run with the smallest distance is
  removed. A block's score is the smallest distance of a run that holds it.
- ``perplexity``: the calibration perplexity with that block alone skipped (its output replaced by its input).

Hidden states are taken with hooks on the block list, not from ``output_hidden_states``: most models apply the
final norm to the last entry there, which would hide the last block's raw output.
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum, distributed_world
from .errors import UserError
from .losses import summed_nll
from .truncation import block_output, decoder_blocks

MEASURES = ("block_influence", "angular", "perplexity")
IMPORTANCE_FILE = "importance.png"


def calibration_blocks(tokens, block_size, max_tokens, what):
    """``[n, block_size]`` consecutive blocks from the first ``max_tokens`` tokens (at least one block)."""
    n_blocks = min(len(tokens), max_tokens) // block_size
    if n_blocks == 0:
        raise UserError(f"{what} holds {min(len(tokens), max_tokens)} calibration tokens, fewer than one block of "
                        f"{block_size}: give more text, a larger --calibration_tokens or a smaller --block_size")
    return torch.from_numpy(np.asarray(tokens[: n_blocks * block_size], dtype=np.int64)).view(n_blocks, block_size)


def block_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def capture_states(blocks, states):
    """Append to ``states`` the first block's input and every block's output, in order (depth + 1 tensors)."""
    def save_input(module, args, kwargs):
        states.append(block_input(args, kwargs).detach())

    def save_output(module, args, output):
        states.append(block_output(output).detach())

    handles = [blocks[0].register_forward_pre_hook(save_input, with_kwargs=True)]
    handles += [block.register_forward_hook(save_output) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def skipped(block):
    """The block passes its input through unchanged (its other outputs, if any, are kept)."""
    def pass_through(module, args, kwargs, output):
        hidden = block_input(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden

    handle = block.register_forward_hook(pass_through, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def cosine_sums(states):
    """``[depth + 1, depth + 1]`` sums over tokens of the cosine between states i and j (float64)."""
    flat = torch.stack([state.reshape(-1, state.shape[-1]).double() for state in states])
    unit = F.normalize(flat, dim=-1)
    return torch.einsum("itd,jtd->ij", unit, unit)


def next_token_nll(logits, input_ids):
    return summed_nll(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


@torch.no_grad()
def calibration_sums(model, blocks_of_tokens, measure, batch_size=1):
    """This rank's share of the calibration blocks run through ``model``, summed over all ranks.

    ``cosine``: depth+1 × depth+1 cosine sums between block boundaries, ``n_tokens`` their token count;
    for ``perplexity`` also ``nll_without`` (the summed NLL with each block skipped) and ``nll``.
    """
    blocks = decoder_blocks(model)
    depth = len(blocks)
    device = next(model.parameters()).device
    rank, world_size = distributed_world()
    cosine = torch.zeros(depth + 1, depth + 1, dtype=torch.float64, device=device)
    nll_without = torch.zeros(depth, dtype=torch.float64, device=device)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # tokens with states, predicted tokens, nll
    mine = blocks_of_tokens[rank::world_size]
    for start in range(0, len(mine), batch_size):
        input_ids = mine[start:start + batch_size].to(device)
        states = []
        with capture_states(blocks, states):
            logits = model(input_ids=input_ids, use_cache=False).logits
        cosine += cosine_sums(states)
        counts[0] += input_ids.numel()
        if measure == "perplexity":
            counts[1] += input_ids[:, 1:].numel()
            counts[2] += next_token_nll(logits, input_ids)
            for index, block in enumerate(blocks):
                with skipped(block):
                    nll_without[index] += next_token_nll(model(input_ids=input_ids, use_cache=False).logits, input_ids)
    for sums in (cosine, nll_without, counts):
        all_reduce_sum(sums)
    return {"cosine": cosine.cpu(), "n_tokens": int(counts[0]), "n_predicted": int(counts[1]),
            "nll": float(counts[2]), "nll_without": nll_without.cpu()}


def block_influence_scores(mean_cosine):
    depth = len(mean_cosine) - 1
    return [1.0 - float(mean_cosine[i, i + 1]) for i in range(depth)]


def run_distances(mean_cosine, n_removed):
    """Angular distance arccos(cos)/π between the input and output of each run of ``n_removed`` blocks, by start."""
    depth = len(mean_cosine) - 1
    return [math.acos(max(-1.0, min(1.0, float(mean_cosine[start, start + n_removed])))) / math.pi
            for start in range(depth - n_removed + 1)]


def angular_scores(distances, n_removed, depth):
    return [min(distances[start] for start in range(max(0, i - n_removed + 1), min(i, len(distances) - 1) + 1))
            for i in range(depth)]


def kept_blocks(scores, n_keep):
    """The ``n_keep`` highest-scoring blocks, in teacher order (ties: the earlier block is kept)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:n_keep])


def check_measure(measure):
    if measure not in MEASURES:
        raise UserError(f"--importance {measure}: choose from {', '.join(MEASURES)}")


def measure_importance(model, blocks_of_tokens, measure, n_keep, batch_size=1):
    """``(layers kept, record for truncation.json)``."""
    check_measure(measure)
    sums = calibration_sums(model, blocks_of_tokens, measure, batch_size)
    mean_cosine = sums["cosine"] / sums["n_tokens"]
    depth = len(mean_cosine) - 1
    record = {"measure": measure, "calibration_tokens": sums["n_tokens"], "block_size": blocks_of_tokens.shape[1]}
    if measure == "block_influence":
        scores = block_influence_scores(mean_cosine)
        layers = kept_blocks(scores, n_keep)
    elif measure == "angular":
        n_removed = depth - n_keep
        if n_removed == 0:  # no run to remove: every block is kept, at distance 0
            scores, layers = [0.0] * depth, list(range(depth))
            record["removed_run"] = []
        else:
            distances = run_distances(mean_cosine, n_removed)
            start = min(range(len(distances)), key=lambda s: (distances[s], s))
            scores = angular_scores(distances, n_removed, depth)
            layers = [i for i in range(depth) if not start <= i < start + n_removed]
            record.update(run_distances=distances, removed_run=list(range(start, start + n_removed)))
    else:
        scores = [math.exp(float(nll) / sums["n_predicted"]) for nll in sums["nll_without"]]
        layers = kept_blocks(scores, n_keep)
        record["perplexity"] = math.exp(sums["nll"] / sums["n_predicted"])
    record["scores"] = scores
    return layers, record


def plot_importance(record, layers, path):
    """A bar per teacher block, the kept ones filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = record["scores"]
    colors = ["tab:blue" if i in layers else "lightgray" for i in range(len(scores))]
    figure, axes = plt.subplots(figsize=(max(4.0, 0.4 * len(scores) + 2), 3.2))
    axes.bar(range(len(scores)), scores, color=colors, edgecolor="black", linewidth=0.5)
    axes.set_xlabel("teacher block")
    axes.set_ylabel(record["measure"])
    axes.set_title(f"{record['measure']}: kept {len(layers)} of {len(scores)} (blue), "
                   f"{record['calibration_tokens']:,} calibration tokens", fontsize=9)
    axes.set_xticks(range(len(scores)))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
