"""Training losses: small pure functions over logits and hidden states of shape ``[batch, positions, …]``.

Every term is a sum over the real positions (``mask`` true) divided by a token count: their number, or
``n_tokens`` when given. Passing the real-token count of a whole accumulated batch (all micro-batches, all
ranks) as ``n_tokens`` makes the micro-batch terms add up to the average over that batch.

Full-vocabulary terms are computed a chunk of positions at a time, upcast to float32 (float64 stays float64)
per chunk: no float32 vocabulary-wide tensor of the whole batch ever exists. The next-token cross-entropy
(``summed_nll``) serves training, distillation, evaluation and importance; it can start from the last hidden
states and the output layer, so that not even the logits of the batch exist.
"""
import functools
import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
CHUNK_ELEMENTS = 2 ** 22  # 16 MiB of float32 per tensor per chunk
LARGE_CHUNK_ELEMENTS = 2 ** 25  # 128 MiB


def next_token_targets(labels):
    """Targets aligned with the logits: position t predicts ``labels[t + 1]``; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _upcast(tensor):
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _first_derivative_only(backward):
    """Refuses a backward with ``create_graph=True``: these backwards build no graph, so a second derivative would
    silently leave their term out. (torch's ``once_differentiable`` raises only when the incoming gradient itself
    requires grad, which a loss's, a constant, does not.)"""

    @functools.wraps(backward)
    def refusing(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError("the chunked losses have no second derivatives: call backward without create_graph")
        return backward(ctx, *grads)

    return refusing


class _ChunkedMaskedSum(torch.autograd.Function):
    """Σ over kept positions of ``row_values(*rows)``, a chunk of positions at a time, in forward and backward.

    The forward keeps no intermediate. The backward recomputes each chunk with autograd and writes its
    gradient into one buffer per differentiable input: slicing inside autograd instead would allocate a
    whole-input gradient per chunk.
    """

    @staticmethod
    def forward(ctx, row_values, keep, chunk, *tensors):
        ctx.row_values, ctx.chunk = row_values, chunk
        ctx.save_for_backward(keep, *tensors)
        total = torch.zeros((), dtype=_upcast(tensors[0]).dtype, device=tensors[0].device)
        for _, rows, kept in _chunks(tensors, keep, chunk):
            total += row_values(*rows)[kept].sum()
        return total

    @staticmethod
    @_first_derivative_only
    def backward(ctx, grad_total):
        keep, *tensors = ctx.saved_tensors
        wanted = ctx.needs_input_grad[3:]
        grads = [torch.zeros_like(tensor) if needed else None for tensor, needed in zip(tensors, wanted)]
        for start, rows, kept in _chunks(tensors, keep, ctx.chunk):
            rows = [row.detach().requires_grad_(needed) for row, needed in zip(rows, wanted)]
            with torch.enable_grad():
                chunk_total = ctx.row_values(*rows)[kept].sum()
            inputs = [row for row, needed in zip(rows, wanted) if needed]
            for grad, chunk_grad in zip([g for g in grads if g is not None],
                                        torch.autograd.grad(chunk_total, inputs, grad_total)):
                grad[start:start + len(kept)] = chunk_grad
        return (None, None, None, *grads)


def _chunks(tensors, keep, chunk):
    """``(first position, rows of each tensor, kept flags)`` per chunk, skipping chunks with no kept position."""
    for start in range(0, keep.numel(), chunk):
        kept = keep[start:start + chunk]
        if kept.any():
            yield start, [tensor[start:start + chunk] for tensor in tensors], kept


def _masked_sum(row_values, tensors, mask):
    """Sum of ``row_values(*rows)`` over the positions where ``mask`` is true, computed in chunks of positions."""
    flat = [tensor.reshape(mask.numel(), *tensor.shape[mask.dim():]) for tensor in tensors]
    width = flat[0].shape[-1] if flat[0].dim() > 1 else 1
    return _ChunkedMaskedSum.apply(row_values, mask.reshape(-1), chunk_rows(width, mask.device), *flat)


def _average(total, mask, n_tokens):
    count = mask.sum() if n_tokens is None else n_tokens
    return total / torch.as_tensor(count, dtype=total.dtype, device=total.device).clamp_min(1)


def _kl_rows(log_p, log_q):
    """KL(p ‖ q) = Σ_v p (log p − log q) per row, with 0 · log 0 = 0 where p is 0 (a ``-inf`` logit). Those
    entries are zeroed before the product, not after: its gradient there would be 0 · ∞."""
    impossible = log_p == -math.inf
    log_p, log_q = log_p.masked_fill(impossible, 0), log_q.masked_fill(impossible, 0)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence_rows(student_logits, teacher_logits, temperature, divergence="forward_kl", jsd_beta=0.5):
    """Per-position divergence between the teacher's and the student's distributions at ``temperature``.

    ``forward_kl``: KL(teacher ‖ student), the paper's. ``reverse_kl``: KL(student ‖ teacher) (MiniLLM).
    ``jsd``: generalised Jensen–Shannon with mixture m = β·p_teacher + (1−β)·p_student,
    β·KL(teacher ‖ m) + (1−β)·KL(student ‖ m) (GKD); β = 0.5 is the usual JSD.
    """
    log_student = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_teacher = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    if divergence == "forward_kl":
        return _kl_rows(log_teacher, log_student)
    if divergence == "reverse_kl":
        return _kl_rows(log_student, log_teacher)
    if divergence == "jsd":
        # Where both are -inf so is the mixture, and logaddexp's gradient is 0 · ∞; _kl_rows drops those
        # entries from both terms, so any finite stand-in will do.
        impossible = (log_teacher == -math.inf) & (log_student == -math.inf)
        log_mixture = torch.logaddexp(log_teacher.masked_fill(impossible, 0) + math.log(jsd_beta),
                                      log_student.masked_fill(impossible, 0) + math.log1p(-jsd_beta))
        return jsd_beta * _kl_rows(log_teacher, log_mixture) + (1 - jsd_beta) * _kl_rows(log_student, log_mixture)
    raise ValueError(f"unknown divergence {divergence!r}; choose from {', '.join(DIVERGENCES)}")


def kd_loss(student_logits, teacher_logits, mask, temperature=2.0, divergence="forward_kl", jsd_beta=0.5,
            n_tokens=None):
    """T² · divergence(teacher, student at temperature T), averaged over real tokens.

    The T² keeps the gradient's scale independent of T (Hinton et al., 2015); it applies to every divergence.
    """
    rows = functools.partial(divergence_rows, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta)
    return temperature ** 2 * _average(_masked_sum(rows, (student_logits, teacher_logits), mask), mask, n_tokens)


def lm_loss(student_logits, targets, n_tokens=None):
    """Next-token cross-entropy, averaged over the positions with a target (``targets`` from next_token_targets)."""
    total = summed_nll(student_logits.flatten(0, -2), targets.flatten())
    return _average(total, targets != IGNORE_INDEX, n_tokens)


def chunk_rows(vocabulary_size, device, large=False):
    """Positions per chunk of a vocabulary-wide computation. On GPUs, or ``large``, bigger chunks keep the output
    layer's matrix products efficient (each chunk reads the whole weight); on CPUs small ones stay in cache."""
    elements = LARGE_CHUNK_ELEMENTS if large or device.type != "cpu" else CHUNK_ELEMENTS
    return max(1, elements // vocabulary_size)


def summed_nll(inputs, targets, weight=None):
    """Σ next-token NLL over the ``targets`` [n] that are not IGNORE_INDEX: the project's one cross-entropy.

    ``inputs`` [n, d] are last hidden states and ``weight`` [vocabulary, d] the output layer (logits = inputs @
    weight.T, no bias), or ``weight`` is None and ``inputs`` [n, vocabulary] are the logits. It runs a chunk of
    positions at a time, so neither the logits of the whole batch nor their gradient ever exist. Gradients are
    computed, during the forward pass, only for the inputs that want them (none under ``torch.no_grad``). Matrix
    products run in the autocast dtype when autocast is on; log-sum-exp and sums in float32 (float64 stays float64).
    """
    vocabulary = inputs.shape[-1] if weight is None else weight.shape[0]
    wanted = torch.is_grad_enabled() and (inputs.requires_grad or (weight is not None and weight.requires_grad))
    if wanted:
        # In 16 bits each chunk adds its weight-gradient product into the float32 gradient, a vocabulary × d
        # pass: chunks are large on CPUs too.
        half = weight is not None and _product_dtype(inputs, weight).itemsize == 2
        return _NextTokenNLL.apply(inputs, weight, targets, chunk_rows(vocabulary, inputs.device, large=half))
    # The loss alone needs no gradient buffers: chunks through the output layer can be large on CPUs too, so
    # that it reads the weight fewer times. Chunks of given logits gain nothing from it.
    return _nll_chunks(inputs, weight, targets, chunk_rows(vocabulary, inputs.device, large=weight is not None))[0]


class _NextTokenNLL(torch.autograd.Function):
    """``summed_nll`` with gradients. The loss is the last operation of the graph, so its gradients are computed in
    the forward pass, chunk by chunk, and only scaled in the backward."""

    @staticmethod
    def forward(ctx, inputs, weight, targets, chunk):
        total, grad_inputs, grad_weight = _nll_chunks(inputs, weight, targets, chunk, *ctx.needs_input_grad[:2])
        ctx.dtypes = inputs.dtype, None if weight is None else weight.dtype
        ctx.save_for_backward(grad_inputs)
        # The weight's gradient (vocabulary × d) is scaled in place and handed over: a fresh one per step would
        # cost a pass of page faults on CPUs. So it is kept on ctx, not saved, and can serve only one backward.
        ctx.grad_weight = grad_weight
        return total

    @staticmethod
    @_first_derivative_only
    def backward(ctx, grad_total):
        (grad_inputs,), grad_weight = ctx.saved_tensors, ctx.grad_weight
        if ctx.needs_input_grad[1] and grad_weight is None:
            raise RuntimeError("summed_nll's weight gradient was already handed over: backward once per forward")
        ctx.grad_weight = None
        scaled = [None if grad_inputs is None else (grad_inputs * grad_total).to(ctx.dtypes[0]),
                  None if grad_weight is None else grad_weight.mul_(grad_total).to(ctx.dtypes[1])]
        return *scaled, None, None


def _product_dtype(inputs, weight):
    """The dtype the output layer's products run in: autocast's when it is on, else the weight's (for given
    logits, their own)."""
    device_type = inputs.device.type
    if weight is not None and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return (inputs if weight is None else weight).dtype


def _nll_chunks(inputs, weight, targets, chunk, want_inputs=False, want_weight=False):
    """``(Σ NLL, gradient of inputs or None, gradient of weight or None)``, a chunk of positions at a time."""
    device_type = inputs.device.type
    dtype = _product_dtype(inputs, weight)
    buffer_dtype = torch.promote_types(dtype, torch.float32)
    with torch.autocast(device_type, enabled=False):
        matrix, states = (None if weight is None else weight.to(dtype)), inputs.to(dtype)
        # Gradients stay in float32 until the backward scales them: in fp16 the gradient of the unscaled summed
        # loss overflows long before the loss-scaled one would. Logits' gradients (probabilities) cannot.
        grad_inputs = (torch.empty_like(inputs, dtype=inputs.dtype if matrix is None else buffer_dtype)
                       if want_inputs else None)
        # Written by the first chunk, so left unfilled unless there is none.
        grad_weight = ((torch.empty_like if len(inputs) else torch.zeros_like)(weight, dtype=buffer_dtype)
                       if want_weight else None)
        product = (torch.empty_like(weight, dtype=dtype) if want_weight and dtype != buffer_dtype else None)
        total = torch.zeros((), dtype=torch.float64, device=inputs.device)
        # One buffer for every chunk's logits: on CPU a fresh one per chunk costs page faults.
        vocabulary = states.shape[-1] if matrix is None else len(matrix)
        buffer = torch.empty(min(chunk, len(states)), vocabulary, dtype=buffer_dtype, device=inputs.device)
        for start in range(0, len(states), chunk):
            rows, row_targets = states[start:start + chunk], targets[start:start + chunk]
            logits = buffer[:len(rows)]
            if matrix is None:
                logits.copy_(rows)
            elif dtype == buffer_dtype:
                torch.matmul(rows, matrix.t(), out=logits)
            else:
                logits.copy_(rows @ matrix.t())
            real = (row_targets != IGNORE_INDEX).unsqueeze(1)
            safe_targets = row_targets.clamp_min(0).unsqueeze(1)
            log_probabilities = _log_softmax_rows(logits)
            total -= log_probabilities.gather(1, safe_targets).masked_fill(~real, 0).sum(dtype=torch.float64)
            if not (want_inputs or want_weight):
                continue
            probabilities = log_probabilities.exp_()  # d loss / d logits = softmax − one-hot
            probabilities.scatter_add_(1, safe_targets, -real.to(probabilities.dtype)).mul_(real)
            if matrix is None:
                grad_inputs[start:start + chunk] = probabilities
                continue
            gradient = probabilities.to(dtype)
            if want_inputs:
                grad_inputs[start:start + chunk] = gradient @ matrix
            if want_weight:
                _add_weight_gradient(grad_weight, gradient, rows, product, first=start == 0)
    return total.to(buffer_dtype), grad_inputs, grad_weight


def _add_weight_gradient(grad_weight, gradient, rows, product, first):
    """``grad_weight`` = (first chunk) or += gradientᵀ · rows, the product in ``gradient``'s dtype: straight into
    ``grad_weight`` when the dtypes agree, else through ``product`` (16 bits into float32). Writing the first chunk
    spares zero-filling the vocabulary × d gradient."""
    if product is None:
        if first:
            torch.mm(gradient.t(), rows, out=grad_weight)
        else:
            grad_weight.addmm_(gradient.t(), rows)
        return
    scale = None
    if gradient.dtype == torch.float16:
        # Σ over a chunk's rows of the unscaled gradient can pass fp16's range: the product runs on (p − y)
        # scaled down by a power of two, undone in the float32 sum. bf16 has float32's range.
        scale = _fp16_safe_scale(rows)
        gradient.mul_(scale.to(gradient.dtype))
    torch.mm(gradient.t(), rows, out=product)
    if first:
        grad_weight.copy_(product)
        if scale is not None:
            grad_weight.div_(scale)
    elif scale is not None:
        grad_weight.addcdiv_(product, scale)
    else:
        grad_weight.add_(product)


def _log_softmax_rows(logits):
    """Log-softmax over the last dimension; on CPU in place (its kernel finishes each row's reductions before it
    writes the row), where a fresh chunk-sized tensor, or logsumexp's temporaries, would cost a pass of page faults."""
    if logits.device.type == "cpu":
        return torch.log_softmax(logits, dim=-1, out=logits)
    return torch.log_softmax(logits, dim=-1)


def _fp16_safe_scale(rows):
    """A power of two s ≤ 1 that keeps every entry of s · (p − y)ᵀ rows, and every partial sum of it, within half
    of fp16's range (half: room for rounding): as |p − y| ≤ 1, each is at most Σ over the rows of |h|."""
    bound = rows.abs().sum(0, dtype=torch.float32).amax()
    return torch.exp2(-torch.log2(bound / (torch.finfo(torch.float16).max / 2)).ceil().clamp_min(0))


def _cosine_distance_rows(student_hidden, teacher_hidden):
    return 1 - F.cosine_similarity(_upcast(student_hidden), _upcast(teacher_hidden), dim=-1)


def cosine_loss(student_hidden, teacher_hidden, mask, n_tokens=None):
    """1 − cos(student's, teacher's last hidden state), averaged over real tokens. Needs equal hidden sizes."""
    return _average(_masked_sum(_cosine_distance_rows, (student_hidden, teacher_hidden), mask), mask, n_tokens)


def _squared_error_rows(student_logits, teacher_logits):
    return (_upcast(student_logits) - _upcast(teacher_logits)).pow(2).sum(-1)


def mse_loss(student_logits, teacher_logits, mask, n_tokens=None):
    """‖z_student − z_teacher‖² summed over the vocabulary, averaged over real tokens (the original's MSE)."""
    return _average(_masked_sum(_squared_error_rows, (student_logits, teacher_logits), mask), mask, n_tokens)
