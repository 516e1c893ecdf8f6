"""Intermediate-layer distillation terms against a direct eager computation (float64)."""
import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM)

from lmcompress import intermediate
from lmcompress.errors import UserError


def tiny_gpt2(n_head=2, n_embd=16, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=n_embd, n_layer=2, n_head=n_head)
    return GPT2LMHeadModel(config).double().eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).double().eval()


def tiny_neox(seed=0):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=32)
    return GPTNeoXForCausalLM(config).double().eval()


def tiny_mistral(seed=0, sliding_window=3):
    """A window shorter than the inputs' 9 positions, so the last layer's attention is not full causal."""
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                           sliding_window=sliding_window)
    return MistralForCausalLM(config).double().eval()


def tiny_opt(seed=0, n_head=4):
    """OPT scales its queries before the attention call (which gets scaling 1)."""
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=n_head,
                       max_position_embeddings=32, word_embed_proj_dim=16)
    return OPTForCausalLM(config).double().eval()


def eager_attentions(model, ids, mask):
    model.set_attn_implementation("eager")
    return model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[-1]


def eager_att_kl(t_att, s_att, query_mask):
    kl = (t_att * (t_att.clamp_min(1e-300).log() - s_att.clamp_min(1e-300).log())).sum(-1)  # (B, H, T)
    return (kl * query_mask[:, None, :]).sum() / (t_att.shape[1] * query_mask.sum())


def inputs():
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, shorter than tiny_mistral's window: no query sees only padding
    return ids, mask


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, tiny_neox, tiny_mistral, tiny_opt])
@pytest.mark.parametrize("chunk", [intermediate.QUERY_CHUNK, 4], ids=["one-chunk", "three-chunks"])
def test_attention_kl_matches_eager_values_and_gradients(make, chunk, monkeypatch):
    monkeypatch.setattr(intermediate, "QUERY_CHUNK", chunk)  # 9 positions: queries 0-3, 4-7 and 8
    chunks, chunk_kl = [], intermediate._chunk_kl
    monkeypatch.setattr(intermediate, "_chunk_kl", lambda *args: chunks.append(1) or chunk_kl(*args))
    teacher, student = make(seed=0), make(seed=1)
    ids, mask = inputs()
    real = mask.bool()
    t_att = eager_attentions(teacher, ids, mask).detach()
    s_att = eager_attentions(student, ids, mask)
    expected = eager_att_kl(t_att, s_att, real.double())
    expected_grad = torch.autograd.grad(expected, list(student.parameters()), allow_unused=True)

    t_store, s_store = intermediate.enable_capture(teacher), intermediate.enable_capture(student)
    with torch.no_grad():
        teacher(input_ids=ids, attention_mask=mask)
    student(input_ids=ids, attention_mask=mask)
    got = intermediate.relation_losses(s_store, t_store, real, real, None, None, True, False)["loss_att"]
    assert len(chunks) == -(-ids.shape[1] // chunk)
    got_grad = torch.autograd.grad(got, list(student.parameters()), allow_unused=True)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grad, expected_grad):
        if e is not None:
            torch.testing.assert_close(g, e)


def test_value_relation_is_causal_and_chunking_does_not_change_it():
    torch.manual_seed(0)
    t_v, s_v = torch.randn(2, 2, 7, 4, dtype=torch.float64), torch.randn(2, 2, 7, 4, dtype=torch.float64)
    real = torch.ones(2, 7, dtype=torch.bool)
    whole = intermediate.relation_kl((t_v, t_v), (s_v, s_v), real, real, 0.5, 0.5, None, chunk=7)
    chunked = intermediate.relation_kl((t_v, t_v), (s_v, s_v), real, real, 0.5, 0.5, None, chunk=2)
    torch.testing.assert_close(whole, chunked)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    t = (t_v @ t_v.transpose(-1, -2) * 0.5).masked_fill(~causal, float("-inf")).log_softmax(-1)
    s = (s_v @ s_v.transpose(-1, -2) * 0.5).masked_fill(~causal, float("-inf")).log_softmax(-1)
    direct = (t.exp() * (t - s)).nan_to_num().sum(-1).sum() / (2 * 14)
    torch.testing.assert_close(whole, direct)


def direct_relation_kl(teacher, student, real, n_heads):
    """KL(teacher ‖ student) of causal softmax(a·bᵀ/√d) over real keys, with each model's heads merged and split
    into ``n_heads`` (MiniLMv2), averaged over heads and real queries: whole T × T maps, no chunks."""
    def log_relations(a, b):
        a, b = (x.transpose(1, 2).flatten(2) for x in (a, b))  # (B, T, H·d)
        a, b = (x.unflatten(2, (n_heads, -1)).transpose(1, 2) for x in (a, b))  # (B, R, T, d_r)
        length = a.shape[2]
        allowed = torch.ones(length, length, dtype=torch.bool).tril() & real[:, None, None, :]
        allowed = allowed | torch.eye(length, dtype=torch.bool)
        scores = (a @ b.transpose(-1, -2) / a.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf"))
        return scores.log_softmax(-1), allowed

    (t_logp, allowed), (s_logp, _) = log_relations(*teacher), log_relations(*student)
    kl = (t_logp.exp() * (t_logp - s_logp)).masked_fill(~allowed, 0).sum(-1)  # (B, R, T)
    return (kl * real[:, None, :]).sum() / (n_heads * real.sum())


def test_different_head_counts_regroup_as_minilmv2_or_refuse():
    teacher, student = tiny_gpt2(n_head=4), tiny_gpt2(n_head=2)
    ids, mask = inputs()
    real = mask.bool()
    t_store, s_store = intermediate.enable_capture(teacher), intermediate.enable_capture(student)
    teacher(input_ids=ids, attention_mask=mask)
    student(input_ids=ids, attention_mask=mask)
    with pytest.raises(UserError, match="--num_relation_heads"):
        intermediate.relation_losses(s_store, t_store, real, real, None, None, True, True)
    terms = intermediate.relation_losses(s_store, t_store, real, real, None, 2, True, True)
    q, k, v = "query", "key", "value"
    torch.testing.assert_close(terms["loss_att"], direct_relation_kl((t_store[q], t_store[k]),
                                                                     (s_store[q], s_store[k]), real, 2))
    torch.testing.assert_close(terms["loss_val"], direct_relation_kl((t_store[v], t_store[v]),
                                                                     (s_store[v], s_store[v]), real, 2))


def test_regrouped_heads_of_a_model_that_scales_its_queries_first_are_scaled_once():
    teacher, student = tiny_opt(n_head=4), tiny_opt(seed=1, n_head=2)
    ids, mask = inputs()
    real = mask.bool()
    t_store, s_store = intermediate.enable_capture(teacher), intermediate.enable_capture(student)
    teacher(input_ids=ids, attention_mask=mask)
    student(input_ids=ids, attention_mask=mask)
    assert t_store["scaling"] == s_store["scaling"] == 1.0
    unscaled = {name: store["query"] * store["query"].shape[-1] ** 0.5 for name, store in (("t", t_store),
                                                                                           ("s", s_store))}
    got = intermediate.relation_losses(s_store, t_store, real, real, None, 2, True, False)["loss_att"]
    torch.testing.assert_close(got, direct_relation_kl((unscaled["t"], t_store["key"]),
                                                       (unscaled["s"], s_store["key"]), real, 2))


def test_sliding_windows_that_differ_at_the_block_size_are_refused_in_one_line():
    ids, mask = inputs()  # 9 positions
    real = mask.bool()
    stores = {}
    for name, window in (("window 3", 3), ("window 9", 9), ("full", None)):
        model = tiny_mistral(sliding_window=window)
        stores[name] = intermediate.enable_capture(model)
        model(input_ids=ids, attention_mask=mask)
    # A window as long as the block is no window: those two agree.
    intermediate.relation_losses(stores["window 9"], stores["full"], real, real, None, None, True, True)
    with pytest.raises(UserError, match="the teacher's last layer attends over a sliding window of 3 positions and "
                                        "the student's over all earlier positions at --block_size 9"):
        intermediate.relation_losses(stores["full"], stores["window 3"], real, real, None, None, True, True)


def test_relation_head_counts_are_checked_against_both_layouts():
    assert intermediate.common_relation_heads((4, 8), (4, 4), None) == 4
    assert intermediate.common_relation_heads((12, 64), (4, 32), 8) == 8
    with pytest.raises(UserError, match="the teacher's last layer has 12 attention heads and the student's 4: give "
                                        "--num_relation_heads"):
        intermediate.common_relation_heads((12, 64), (4, 32), None)
    with pytest.raises(UserError, match="--num_relation_heads 0: must be above zero"):
        intermediate.common_relation_heads((4, 8), (4, 8), 0)
    with pytest.raises(UserError, match="--num_relation_heads 3: .* divide the student's 128 attention channels"):
        intermediate.common_relation_heads((12, 64), (4, 32), 3)


def test_a_student_without_a_layer_record_uses_the_evenly_spread_map_and_says_so_on_stderr(capsys):
    from types import SimpleNamespace

    args = SimpleNamespace(alpha_hidden=1.0, alpha_att=0.0, alpha_val=0.0, layer_map=None)
    intermediate.Taps(args, tiny_gpt2(), tiny_gpt2(seed=1), None, "truncation.json")
    assert args.resolved_layer_map == [(0, 0), (1, 1)]
    out, err = capsys.readouterr()
    assert "no truncation.json and no --layer_map was given: --alpha_hidden uses the evenly spread map 0:0,1:1" in err
    assert out == ""


def test_soft_capped_attention_is_refused_in_one_line():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    with pytest.raises(UserError, match="Gemma2ForCausalLM soft-caps its attention logits"):
        intermediate.enable_capture(Gemma2ForCausalLM(config))


def test_hidden_loss_is_zero_for_identical_states_and_positive_otherwise():
    h = [torch.randn(2, 5, 8, dtype=torch.float64) for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert intermediate.hidden_loss(h, h, [(0, 0), (1, 1)], mask, None) == 0
    assert intermediate.hidden_loss(h, h, [(0, 1), (1, 2)], mask, None) > 0


def test_layer_maps():
    assert intermediate.even_map(3, 12) == [(0, 0), (1, 6), (2, 11)]
    assert intermediate.parse_layer_map("0:0,1:2", 2, 4) == [(0, 0), (1, 2)]
    with pytest.raises(UserError, match="--layer_map 0:0,1:9: the teacher has no block 9"):
        intermediate.parse_layer_map("0:0,1:9", 2, 4)
    with pytest.raises(UserError, match="the student has no block 5"):
        intermediate.parse_layer_map("5:0", 2, 4)
    with pytest.raises(UserError, match="student:teacher block pairs"):
        intermediate.parse_layer_map("0-0", 2, 4)
