"""Chunked log-probs/entropy and micro-batched scoring give what the plain full-vocabulary computation gives."""
import pytest
import torch

from character.training.ppo.rollouts import forward_in_batches, logprobs_and_entropy, token_entropy, token_logprobs

B, L, V = 3, 11, 37


def unchunked(logits, input_ids):
    """The straightforward reference: one fp32 log_softmax over every position."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def random_batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, L, V, generator=g)).to(dtype)
    return logits, torch.randint(0, V, (B, L), generator=g)


@pytest.mark.parametrize("chunk", [1, 4, 5, L - 1, L, 500])  # 4 does not divide L-1=10; >= L
def test_chunked_equals_unchunked(chunk):
    logits, ids = random_batch()
    logp, entropy = logprobs_and_entropy(logits, ids, chunk_size=chunk)
    want_logp, want_entropy = unchunked(logits, ids)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == (B, L - 1)
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=0)


def test_without_entropy_and_old_names():
    logits, ids = random_batch(1)
    logp, entropy = logprobs_and_entropy(logits, ids, chunk_size=3, with_entropy=False)
    want_logp, want_entropy = unchunked(logits, ids)
    assert entropy is None
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(token_logprobs(logits, ids), want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(token_entropy(logits), want_entropy, atol=1e-5, rtol=0)


def test_bf16_logits_are_scored_in_fp32():
    logits, ids = random_batch(2, torch.bfloat16)
    logp, entropy = logprobs_and_entropy(logits, ids, chunk_size=4)
    want_logp, want_entropy = unchunked(logits, ids)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("chunk", [1, 4, 500])
def test_gradients_equal_unchunked(chunk, with_entropy):
    logits, ids = random_batch(3)
    g = torch.Generator().manual_seed(4)
    w_logp, w_entropy = torch.randn(B, L - 1, generator=g), torch.randn(B, L - 1, generator=g)

    def loss(logp, entropy):
        return (w_logp * logp).sum() + ((w_entropy * entropy).sum() if with_entropy else 0)

    mine = logits.clone().requires_grad_()
    loss(*logprobs_and_entropy(mine, ids, chunk_size=chunk, with_entropy=with_entropy)).backward()
    ref = logits.clone().requires_grad_()
    loss(*unchunked(ref, ids)).backward()
    torch.testing.assert_close(mine.grad, ref.grad, atol=1e-5, rtol=0)
    assert mine.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_gradient_through_entropy_only():
    logits, ids = random_batch(5)
    mine = logits.clone().requires_grad_()
    logprobs_and_entropy(mine, ids, chunk_size=4)[1].sum().backward()
    ref = logits.clone().requires_grad_()
    unchunked(ref, ids)[1].sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).eval().float()


@pytest.mark.parametrize("batch_size", [1, 3, 5, 64])
def test_forward_in_batches_matches_one_forward(tiny_llama, batch_size):
    lengths = [9, 4, 12, 7, 1]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)  # right-padded with 0
    mask = torch.zeros_like(ids)
    g = torch.Generator().manual_seed(6)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 300, (n,), generator=g)
        mask[row, :n] = 1
    calls = []

    def forward(**kw):
        calls.append(kw["input_ids"].shape[0])
        return tiny_llama(**kw)

    with torch.no_grad():
        want_logp, want_entropy = unchunked(tiny_llama(input_ids=ids, attention_mask=mask).logits, ids)
        logp, entropy = forward_in_batches(forward, ids, mask, batch_size,
                                           lambda out, sub: logprobs_and_entropy(out.logits, sub, chunk_size=5))
        only_logp, none = forward_in_batches(
            tiny_llama, ids, mask, batch_size,
            lambda out, sub: logprobs_and_entropy(out.logits, sub, with_entropy=False))
        plain = forward_in_batches(tiny_llama, ids, mask, batch_size, lambda out, sub: token_logprobs(out.logits, sub))
    assert max(calls) <= batch_size and sum(calls) == len(lengths)
    for got in (logp, only_logp, plain):
        assert got.shape == want_logp.shape
        torch.testing.assert_close(got, want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=0)
    assert none is None
