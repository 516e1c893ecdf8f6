"""The distillation losses against direct computations: zero at teacher = student, masking, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmcompress import losses
from lmcompress.losses import DIVERGENCES, IGNORE_INDEX, cosine_loss, kd_loss, lm_loss, mse_loss, next_token_targets
from recorders import NewTensors, VocabularyProducts

VOCAB = 11


def batch(dtype=torch.float32, seed=0):
    """Student and teacher logits for 2 rows of 6 positions; the second row's last 2 positions are padding."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 6, VOCAB, generator=generator, dtype=dtype) * 2
    teacher = torch.randn(2, 6, VOCAB, generator=generator, dtype=dtype) * 2
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return student, teacher, mask


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_is_zero_when_teacher_equals_student(divergence):
    student, _, mask = batch()
    loss = kd_loss(student, student.clone(), mask, temperature=2.0, divergence=divergence, jsd_beta=0.3)
    assert abs(loss.item()) < 1e-6


def test_forward_kl_matches_direct_computation():
    student, teacher, mask = batch(torch.float64)
    temperature = 2.0
    p_teacher = F.softmax(teacher / temperature, dim=-1)
    per_position = (p_teacher * (p_teacher.log() - F.log_softmax(student / temperature, dim=-1))).sum(-1)
    expected = temperature ** 2 * per_position[mask].sum() / mask.sum()
    assert torch.allclose(kd_loss(student, teacher, mask, temperature), expected, atol=1e-12)


def test_reverse_kl_and_jsd_match_direct_computations():
    student, teacher, mask = batch(torch.float64)
    p_s, p_t = F.softmax(student, dim=-1), F.softmax(teacher, dim=-1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    beta = 0.3
    mixture = beta * p_t + (1 - beta) * p_s
    expected = {"reverse_kl": kl(p_s, p_t), "jsd": beta * kl(p_t, mixture) + (1 - beta) * kl(p_s, mixture)}
    for divergence, per_position in expected.items():
        loss = kd_loss(student, teacher, mask, 1.0, divergence, jsd_beta=beta)
        assert torch.allclose(loss, per_position[mask].mean(), atol=1e-12), divergence


def test_lm_loss_matches_cross_entropy_on_shifted_labels():
    student, _, mask = batch(torch.float64)
    labels = torch.randint(0, VOCAB, (2, 6))
    labels[1, 4:] = IGNORE_INDEX
    expected = F.cross_entropy(student[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert torch.allclose(lm_loss(student, next_token_targets(labels)), expected, atol=1e-12)


def test_cosine_and_mse_match_direct_computations():
    student, teacher, mask = batch(torch.float64)
    cosine = 1 - F.cosine_similarity(student, teacher, dim=-1)
    assert torch.allclose(cosine_loss(student, teacher, mask), cosine[mask].mean(), atol=1e-12)
    squared = (student - teacher).pow(2).sum(-1)
    assert torch.allclose(mse_loss(student, teacher, mask), squared[mask].mean(), atol=1e-12)


def test_padding_positions_do_not_change_any_loss():
    student, teacher, mask = batch()
    labels = torch.randint(0, VOCAB, (2, 6))
    labels[1, 4:] = IGNORE_INDEX
    targets = next_token_targets(labels)
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~mask] = torch.randn_like(noisy_student[~mask]) * 50
    noisy_teacher[~mask] = torch.randn_like(noisy_teacher[~mask]) * 50
    for divergence in DIVERGENCES:
        assert kd_loss(student, teacher, mask, 2.0, divergence) == kd_loss(noisy_student, noisy_teacher, mask, 2.0,
                                                                           divergence)
    assert lm_loss(student, targets) == lm_loss(noisy_student, targets)
    assert cosine_loss(student, teacher, mask) == cosine_loss(noisy_student, noisy_teacher, mask)
    assert mse_loss(student, teacher, mask) == mse_loss(noisy_student, noisy_teacher, mask)


def test_n_tokens_sums_micro_batches_into_the_whole_batch_average():
    student, teacher, mask = batch()
    whole = kd_loss(student, teacher, mask)
    n_tokens = mask.sum()
    parts = sum(kd_loss(student[i:i + 1], teacher[i:i + 1], mask[i:i + 1], n_tokens=n_tokens) for i in range(2))
    assert torch.allclose(parts, whole, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_gradient_check(divergence):
    student, teacher, mask = batch(torch.float64)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, teacher, mask, 1.7, divergence, jsd_beta=0.4), (student,))


def test_other_terms_gradient_check():
    student, teacher, mask = batch(torch.float64)
    student.requires_grad_(True)
    targets = next_token_targets(torch.randint(0, VOCAB, (2, 6)))
    assert torch.autograd.gradcheck(lambda s: lm_loss(s, targets), (student,))
    assert torch.autograd.gradcheck(lambda s: cosine_loss(s, teacher, mask), (student,))
    assert torch.autograd.gradcheck(lambda s: mse_loss(s, teacher, mask), (student,))


def test_chunking_gives_the_same_loss_and_gradient(monkeypatch):
    student, teacher, mask = batch(torch.float64)
    mask[0, 2:4] = False  # with 2 positions per chunk, the second chunk is all padding
    student.requires_grad_(True)
    whole = kd_loss(student, teacher, mask)
    (whole_grad,) = torch.autograd.grad(whole, student)
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", VOCAB * 2)
    chunked = kd_loss(student, teacher, mask)
    (chunked_grad,) = torch.autograd.grad(chunked, student)
    assert torch.allclose(whole, chunked, atol=1e-12) and torch.allclose(whole_grad, chunked_grad, atol=1e-12)


def test_half_precision_logits_are_computed_in_float32():
    student, teacher, mask = batch()
    loss = kd_loss(student.bfloat16(), teacher.bfloat16(), mask)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), mask), atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("from_hidden", [True, False], ids=["hidden-and-weight", "logits"])
def test_summed_nll_matches_cross_entropy_and_its_gradients(chunk, from_hidden, monkeypatch):
    """Every chunking, from hidden states and the output layer or from logits, with and without gradients."""
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (10,))
    targets[[0, 7]] = IGNORE_INDEX
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 13 * chunk)
    monkeypatch.setattr(losses, "LARGE_CHUNK_ELEMENTS", 13 * chunk)
    inputs = (hidden, weight) if from_hidden else (hidden @ weight.t(), None)
    fused = losses.summed_nll(inputs[0], targets, inputs[1]) * 0.5
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    direct = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum") * 0.5
    direct_grads = torch.autograd.grad(direct, (hidden, weight))
    assert fused.item() == pytest.approx(direct.item(), rel=1e-12)
    for got, expected in zip(fused_grads, direct_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert losses.summed_nll(inputs[0], targets, inputs[1]).item() == pytest.approx(direct.item() * 2, rel=1e-12)


@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp16-weights", "fp16-autocast"])
def test_summed_nll_fp16_gradients_follow_the_loss_scale(autocast, chunks, monkeypatch):
    """8192 tokens with one large hidden feature: the unscaled weight gradient passes fp16's range, the scaled
    (here by 2⁻¹⁶, as a loss scaler backing off would) one does not; it must stay finite and match the logits path,
    with fp16 weights (DeepSpeed fp16) and under fp16 autocast, the weight-gradient product in fp16, in one chunk
    and in several."""
    monkeypatch.setattr(losses, "LARGE_CHUNK_ELEMENTS", 16 * 8192 // chunks)  # 16 bits: large chunks
    torch.manual_seed(0)
    hidden = (torch.randn(8192, 8) * 0.1).half()
    hidden[:, 0] = 64.0
    weight = (torch.randn(16, 8) * 0.01).half()
    weight = (weight.float() if autocast else weight).requires_grad_()
    targets = torch.zeros(8192, dtype=torch.long)
    scale = 2.0 ** -16
    recorder = VocabularyProducts(16)
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast), recorder:
        (losses.summed_nll(hidden, targets, weight) * scale).backward()
    assert len(recorder.products) == 2 * chunks and recorder.dtypes() == {torch.float16}, recorder.products
    reference_weight = weight.detach().double().requires_grad_()
    logits = hidden.double() @ reference_weight.t()
    (F.cross_entropy(logits, targets, reduction="sum") * scale).backward()
    assert torch.isfinite(weight.grad).all()
    assert torch.allclose(weight.grad.double(), reference_weight.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_summed_nll_under_autocast_runs_every_product_in_its_dtype(dtype, chunks, monkeypatch):
    """The logits and both gradient products (three per chunk) run in the autocast dtype; loss and gradients
    match float32's to that dtype's precision and the gradients keep the weights' dtype."""
    monkeypatch.setattr(losses, "LARGE_CHUNK_ELEMENTS", 40 * 48 // chunks)  # 16 bits: large chunks
    torch.manual_seed(0)
    hidden = torch.randn(48, 16, requires_grad=True)
    weight = (torch.randn(40, 16) * 0.3).requires_grad_()
    targets = torch.randint(0, 40, (48,))
    recorder = VocabularyProducts(40)
    with torch.autocast("cpu", dtype=dtype), recorder:
        loss = losses.summed_nll(hidden, targets, weight)
        grads = torch.autograd.grad(loss, (hidden, weight))
    assert len(recorder.products) == 3 * chunks and recorder.dtypes() == {dtype}, recorder.products
    direct = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    direct_grads = torch.autograd.grad(direct, (hidden, weight))
    assert loss.item() == pytest.approx(direct.item(), rel=1e-2)
    for got, expected in zip(grads, direct_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_summed_nll_without_gradients_computes_only_the_loss(monkeypatch):
    torch.manual_seed(0)
    hidden = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (12,))
    targets[3] = IGNORE_INDEX
    expected = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    monkeypatch.setattr(losses._NextTokenNLL, "apply", lambda *args: pytest.fail("gradients computed"))
    with torch.no_grad():
        assert torch.allclose(losses.summed_nll(hidden, targets, weight), expected)
    assert torch.allclose(losses.summed_nll(hidden.detach(), targets, weight.detach()), expected)


def test_summed_nll_without_gradients_allocates_nothing_the_size_of_the_output_layer():
    """The weight gradient's vocabulary × d buffer exists only when a gradient is computed."""
    torch.manual_seed(0)
    hidden = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (6,))
    training, evaluation = NewTensors(), NewTensors()
    with training:
        losses.summed_nll(hidden, targets, weight)
    with evaluation, torch.no_grad():
        losses.summed_nll(hidden, targets, weight)
    assert (300, 8) in training.shapes
    assert max(math.prod(shape) for shape in evaluation.shapes) < weight.numel(), evaluation.shapes


def test_summed_nll_loss_alone_reads_the_output_layer_in_larger_chunks(monkeypatch):
    """With gradients, CPU chunks of CHUNK_ELEMENTS (logits, gradient of the states, of the weight: three products
    each); for the loss alone, no gradient buffers, of LARGE_CHUNK_ELEMENTS: the weight is read fewer times."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 13 * 2)
    monkeypatch.setattr(losses, "LARGE_CHUNK_ELEMENTS", 13 * 8)
    hidden = torch.randn(16, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 13, (16,))
    training, evaluation = VocabularyProducts(13), VocabularyProducts(13)
    with training:
        losses.summed_nll(hidden, targets, weight)
    with evaluation, torch.no_grad():
        losses.summed_nll(hidden, targets, weight)
    assert (len(training.products), len(evaluation.products)) == (16 // 2 * 3, 16 // 8)


def test_summed_nll_frozen_weight_gets_no_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64)
    targets = torch.randint(0, 5, (6,))
    (grad,) = torch.autograd.grad(losses.summed_nll(hidden, targets, weight), hidden)
    (expected,) = torch.autograd.grad(F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"), hidden)
    assert weight.grad is None and torch.allclose(grad, expected)


def test_summed_nll_weight_gradient_serves_one_backward_and_no_rows_give_zero():
    """The weight gradient is handed over in place, so a second backward through the same graph must refuse
    rather than rescale what the first handed out; with no rows the gradient is zero, not uninitialised memory."""
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(5, 4, requires_grad=True)
    loss = losses.summed_nll(hidden, torch.randint(0, 5, (6,)), weight)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already handed over: backward once per forward"):
        loss.backward()
    (grad,) = torch.autograd.grad(losses.summed_nll(hidden[:0], torch.zeros(0, dtype=torch.long), weight), weight)
    assert torch.equal(grad, torch.zeros_like(weight))


@pytest.mark.parametrize("term", ["kd", "cosine", "mse", "lm", "fused"])
def test_chunked_terms_refuse_second_derivatives(term):
    """A second derivative through a chunked term raises, instead of silently leaving out the term's own (only
    the square's would remain)."""
    student, teacher, mask = batch(torch.float64)
    student.requires_grad_(True)
    targets = next_token_targets(torch.randint(0, VOCAB, (2, 6)))
    weight = torch.randn(VOCAB, VOCAB, dtype=torch.float64)
    loss = {"kd": lambda: kd_loss(student, teacher, mask), "cosine": lambda: cosine_loss(student, teacher, mask),
            "mse": lambda: mse_loss(student, teacher, mask), "lm": lambda: lm_loss(student, targets),
            "fused": lambda: losses.summed_nll(student.flatten(0, 1), targets.flatten(), weight)}[term]()
    with pytest.raises(RuntimeError, match="no second derivatives"):
        (grad,) = torch.autograd.grad(loss + student.pow(2).sum(), student, create_graph=True)
        torch.autograd.grad(grad.sum(), student)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_minus_infinity_logits_give_finite_divergences_and_gradients(divergence):
    """A masked vocabulary entry (-inf in both models) has probability 0, and 0 · log 0 = 0 as in F.kl_div: loss
    and gradients equal those over the vocabulary without it (the gradient of the masked entry is its limit, 0)."""
    student, teacher, mask = batch(torch.float64)
    student[..., 0] = teacher[..., 0] = -torch.inf
    student.requires_grad_(True), teacher.requires_grad_(True)
    loss = kd_loss(student, teacher, mask, temperature=1.0, divergence=divergence)
    grads = torch.autograd.grad(loss, (student, teacher))
    kept = [logits.detach()[..., 1:].requires_grad_(True) for logits in (student, teacher)]
    reference = kd_loss(*kept, mask, temperature=1.0, divergence=divergence)
    reference_grads = torch.autograd.grad(reference, kept)
    assert torch.isfinite(loss) and torch.allclose(loss, reference)
    for grad, reference_grad in zip(grads, reference_grads):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[..., 0], torch.zeros_like(grad[..., 0]))
        torch.testing.assert_close(grad[..., 1:], reference_grad)


def test_forward_kl_with_a_minus_infinity_teacher_logit_matches_kl_div():
    student, teacher, mask = batch(torch.float64)
    teacher[..., 0] = -torch.inf
    log_teacher, log_student = teacher.log_softmax(-1)[mask], student.log_softmax(-1)[mask]
    expected = F.kl_div(log_student, log_teacher.exp(), reduction="sum") / mask.sum()
    assert torch.allclose(kd_loss(student, teacher, mask, temperature=1.0), expected)
