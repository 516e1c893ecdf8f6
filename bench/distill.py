"""What distillation costs: one distillation step against one plain LM step of the same student, and the peak
memory of the chunked KD loss and of the chunked attention-relation loss against naive ones. Every baseline is
measured in the same run.

    .venv/bin/python -m bench.distill                     # GPT-2 small (12 × 768) → 6 layers, vocabulary 50257
    .venv/bin/python -m bench.distill --n_layer 4 --n_embd 256 --repeats 3    # quicker

Models are randomly initialised (offline). Times are medians of ``--repeats`` steps after one warm-up step.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmcompress.distillation import DistillationArguments, loss_terms, weighted_sum
from lmcompress import intermediate
from lmcompress.losses import kd_loss, next_token_targets
from lmcompress.truncation import select_layers, truncate_model


def forward_flops_per_token(model, block_size):
    """Kaplan et al. (2020): 2 × non-embedding parameters + LM head + 2 × n_layer × n_ctx × d for attention."""
    config = model.config
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    non_embedding = sum(p.numel() for p in model.transformer.parameters()) - embeddings
    return 2 * non_embedding + 2 * config.vocab_size * config.n_embd + 2 * config.n_layer * block_size * config.n_embd


def lm_step(student, optimizer, input_ids):
    loss = student(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def distillation_step(student, teacher, optimizer, input_ids, args):
    targets = next_token_targets(input_ids)
    student_out = student(input_ids=input_ids, output_hidden_states=bool(args.alpha_cos))
    with torch.no_grad():
        teacher_out = teacher(input_ids=input_ids, output_hidden_states=bool(args.alpha_cos))
    weighted_sum(args, loss_terms(args, student_out, teacher_out, targets, None)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def original_distillation_step(student, teacher, optimizer, input_ids, args):
    """The DistilGPT2 distiller's step (HuggingFace research_projects/distillation/distiller.py, causal LM):
    full-vocabulary logits of both models selected by mask, in float32, KL via KLDivLoss(batchmean), the LM loss
    over all logits, and the cosine loss over masked-selected hidden states."""
    temperature = args.temperature
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    s_out = student(input_ids=input_ids, attention_mask=None, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=input_ids, attention_mask=None, output_hidden_states=True)
    s_logits, t_logits = s_out.logits.float(), t_out.logits.float()
    mask = attention_mask.unsqueeze(-1).expand_as(s_logits)
    s_logits_slct = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
    t_logits_slct = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
    loss_ce = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_logits_slct / temperature, dim=-1),
                                                        F.softmax(t_logits_slct / temperature, dim=-1)) * temperature ** 2
    loss = args.alpha_ce * loss_ce
    shift_logits = s_logits[..., :-1, :].contiguous()
    shift_labels = input_ids[..., 1:].contiguous()
    loss = loss + args.alpha_clm * F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    s_hidden, t_hidden = s_out.hidden_states[-1], t_out.hidden_states[-1]
    hidden_mask = attention_mask.unsqueeze(-1).expand_as(s_hidden)
    s_slct = torch.masked_select(s_hidden, hidden_mask).view(-1, s_hidden.size(-1))
    t_slct = torch.masked_select(t_hidden, hidden_mask).view(-1, s_hidden.size(-1))
    target = s_slct.new(s_slct.size(0)).fill_(1)
    loss = loss + args.alpha_cos * torch.nn.CosineEmbeddingLoss(reduction="mean")(s_slct, t_slct, target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def median_seconds(step, repeats, device):
    step()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def naive_forward_kl(student_logits, teacher_logits, mask, temperature):
    """Both full-vocabulary distributions of the whole batch in float32, as the original distiller did."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (p_teacher * (p_teacher.log() - log_p_student)).sum(-1)
    return temperature ** 2 * per_position[mask].sum() / mask.sum()


def peak_bytes(run, device):
    """Peak of the memory allocated while ``run()`` executes, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # The profiler's raw allocator events (signed sizes, in time order) give the CPU allocation timeline.
    events = sorted((event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"),
                    key=lambda event: event.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def kd_memory(loss_fn, student_logits, teacher_logits, mask, device, repeats):
    def run():
        loss = loss_fn(student_logits, teacher_logits, mask, 2.0)
        loss.backward()
        student_logits.grad = None

    return statistics.median(peak_bytes(run, device) for _ in range(repeats))


def benchmark_step(cli, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=cli.vocab_size, n_positions=max(1024, cli.block_size), n_embd=cli.n_embd,
                        n_layer=cli.n_layer, n_head=cli.n_embd // 64)
    teacher = GPT2LMHeadModel(config).to(device).eval().requires_grad_(False)
    layers = select_layers("distil", cli.n_layer, cli.student_layers)
    student = truncate_model(teacher, layers).to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    input_ids = torch.randint(0, cli.vocab_size, (cli.batch_size, cli.block_size), device=device)
    args = DistillationArguments(teacher_name_or_path="teacher", student_name_or_path="student")  # paper's alphas

    lm = median_seconds(lambda: lm_step(student, optimizer, input_ids), cli.repeats, device)
    kd = median_seconds(lambda: distillation_step(student, teacher, optimizer, input_ids, args), cli.repeats, device)
    original = median_seconds(lambda: original_distillation_step(student, teacher, optimizer, input_ids, args),
                              cli.repeats, device)
    kd_peak = peak_bytes(lambda: distillation_step(student, teacher, optimizer, input_ids, args), device)
    original_peak = peak_bytes(lambda: original_distillation_step(student, teacher, optimizer, input_ids, args),
                               device)
    f_student = forward_flops_per_token(student, cli.block_size)
    f_teacher = forward_flops_per_token(teacher, cli.block_size)
    predicted = (3 * f_student + f_teacher) / (3 * f_student)
    print(f"step: teacher {cli.n_layer}×{cli.n_embd} → student layers {','.join(map(str, layers))}, "
          f"vocabulary {cli.vocab_size}, batch {cli.batch_size}×{cli.block_size}, {device.type}")
    print(f"  plain LM step      {lm * 1000:9.1f} ms (median of {cli.repeats})")
    print(f"  distillation step  {kd * 1000:9.1f} ms (median of {cli.repeats}; alpha_ce 5, clm 2, cos 1)")
    print(f"  original distiller {original * 1000:9.1f} ms (DistilGPT2's step: float32 logits, KLDivLoss)")
    print(f"  ratio measured {kd / lm:.2f}, predicted by FLOPs {predicted:.2f} "
          "((3·student + teacher forward) / (3·student))")
    tokens = cli.batch_size * cli.block_size
    return {"stage": f"(c) distillation step, {cli.n_layer}x{cli.n_embd} -> {len(layers)} layers, batch "
                     f"{cli.batch_size}x{cli.block_size}", "baseline": "DistilGPT2 distiller's step", "unit": "ms/step",
            "ours": kd * 1000, "base": original * 1000, "speedup": original / kd, "ours_mb": kd_peak / 2**20,
            "base_mb": original_peak / 2**20, "memory": "allocated in step", "tokens_per_second": tokens / kd,
            "note": f"distillation / plain LM step {kd / lm:.2f} (FLOPs predict {predicted:.2f})"}


def benchmark_memory(cli, device):
    torch.manual_seed(0)
    shape = (cli.batch_size, cli.block_size, cli.vocab_size)
    student_logits = torch.randn(shape, device=device, requires_grad=True)
    teacher_logits = torch.randn(shape, device=device)
    mask = torch.ones(shape[:2], dtype=torch.bool, device=device)
    naive = kd_memory(naive_forward_kl, student_logits, teacher_logits, mask, device, cli.repeats)
    chunked = kd_memory(kd_loss, student_logits, teacher_logits, mask, device, cli.repeats)
    full = student_logits.numel() * 4
    print(f"KD loss memory: {shape[0] * shape[1]} positions × vocabulary {shape[2]}, float32 logits, forward+backward "
          f"(one full-vocabulary float32 tensor = {full / 2**20:.0f} MiB)")
    print(f"  naive (both distributions in float32)  peak {naive / 2**20:8.0f} MiB")
    print(f"  chunked kd_loss                        peak {chunked / 2**20:8.0f} MiB")
    print(f"  ratio {chunked / naive:.2f} (target <= 0.5)")
    return {"stage": f"(c') KD loss, {shape[0]}x{shape[1]} positions, vocabulary {shape[2]}", "baseline": "naive float32 KL",
            "unit": "MiB", "ours": chunked / 2**20, "base": naive / 2**20, "speedup": None, "ours_mb": chunked / 2**20,
            "base_mb": naive / 2**20, "memory": "allocated in loss", "tokens_per_second": None}


def naive_relation_kl(teacher, student, real, query_mask, t_scale, s_scale, n_tokens):
    """``relation_kl``'s arithmetic on all query positions at once, kept for the backward pass: the heads × T × T
    distributions of the whole batch, as an eager attention map would hold them."""
    (t_a, t_b), (s_a, s_b) = teacher, student
    length = t_a.shape[2]
    allowed = intermediate._allowed(0, length, real, length)
    total = intermediate._chunk_kl(t_a, t_b, s_a, s_b, t_scale, s_scale, allowed, query_mask.to(s_a.dtype))
    return total / (t_a.shape[1] * query_mask.sum())


def benchmark_relation_memory(cli, device):
    """The last-layer attention KL (the value relation is the same function of V and V), forward and backward."""
    torch.manual_seed(0)
    heads, head_dim = cli.relation_heads, cli.relation_head_dim
    shape = (cli.relation_batch_size, heads, cli.relation_block_size, head_dim)
    t_query, t_key = torch.randn(shape, device=device), torch.randn(shape, device=device)
    s_query = torch.randn(shape, device=device, requires_grad=True)
    s_key = torch.randn(shape, device=device, requires_grad=True)
    real = torch.ones(shape[0], shape[2], dtype=torch.bool, device=device)
    scale = head_dim ** -0.5

    def memory(loss_fn):
        def run():
            loss_fn((t_query, t_key), (s_query, s_key), real, real, scale, scale, None).backward()
            s_query.grad = s_key.grad = None

        return statistics.median(peak_bytes(run, device) for _ in range(cli.repeats))

    with torch.no_grad():
        args = ((t_query, t_key), (s_query, s_key), real, real, scale, scale, None)
        difference = (intermediate.relation_kl(*args) - naive_relation_kl(*args)).abs().item()
    naive, chunked = memory(naive_relation_kl), memory(intermediate.relation_kl)
    one_map = shape[0] * heads * shape[2] ** 2 * 4
    print(f"attention-relation loss memory: batch {shape[0]}, {heads} heads × {head_dim}, T = {shape[2]}, float32, "
          f"forward+backward (one heads × T × T float32 map = {one_map / 2**20:.0f} MiB)")
    print(f"  naive (full T × T maps)   peak {naive / 2**20:8.0f} MiB")
    print(f"  chunked relation_kl       peak {chunked / 2**20:8.0f} MiB (same value within {difference:.1e})")
    print(f"  ratio {chunked / naive:.2f}")
    return {"stage": f"(c'') attention-relation loss, {shape[0]}x{heads} heads x T={shape[2]}",
            "baseline": "full T x T maps", "unit": "MiB", "ours": chunked / 2**20, "base": naive / 2**20,
            "speedup": None, "ours_mb": chunked / 2**20, "base_mb": naive / 2**20, "memory": "allocated in loss",
            "tokens_per_second": None}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.distill", description=__doc__.splitlines()[0])
    parser.add_argument("--n_layer", type=int, default=12, help="teacher depth")
    parser.add_argument("--n_embd", type=int, default=768, help="hidden size (a multiple of 64)")
    parser.add_argument("--student_layers", type=int, default=None, help="student depth (default: half)")
    parser.add_argument("--vocab_size", type=int, default=50257)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--memory_batch_size", type=int, default=4, help="rows of the KD-loss memory benchmark")
    parser.add_argument("--memory_block_size", type=int, default=256)
    parser.add_argument("--relation_batch_size", type=int, default=2, help="rows of the relation-loss benchmark")
    parser.add_argument("--relation_heads", type=int, default=12)
    parser.add_argument("--relation_head_dim", type=int, default=64)
    parser.add_argument("--relation_block_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    cli = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step_row = benchmark_step(cli, device)
    memory_cli = argparse.Namespace(**{**vars(cli), "batch_size": cli.memory_batch_size,
                                       "block_size": cli.memory_block_size})
    return [step_row, benchmark_memory(memory_cli, device), benchmark_relation_memory(cli, device)]


if __name__ == "__main__":
    main()
