"""attn_implementation="fused_attn" in Hugging Face transformers, against "sdpa" (or "eager").

Small models built from configs with random weights (nothing is downloaded): an encoder (BERT), a
GQA decoder (Llama, num_key_value_heads < num_attention_heads), a sliding-window decoder (Mistral)
and one with sliding windows plus logit softcapping (Gemma 2, compared with "eager" because
transformers' SDPA path refuses softcapping). Padded batches throughout. Bug classes: a mask
function that is not registered (the model silently builds no padding mask), top-left vs
bottom-right causal alignment while decoding with a KV cache, repeated k/v instead of native GQA,
dropout applied in eval mode.
"""
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
transformers = pytest.importorskip("transformers")

from conftest import DEVICE  # noqa: E402

import fused_attn.integrations.transformers as fa_transformers  # noqa: E402

BATCH, SEQLEN, VOCAB = 2, 16, 97
# initializer_range 0.2 (not 0.02) gives scores large enough for masks and softcapping to matter.
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             initializer_range=0.2)


@pytest.fixture(scope="module", autouse=True)
def registered():
    fa_transformers.register()
    assert fa_transformers.is_registered()


@pytest.fixture
def spy(monkeypatch):
    """Records (query heads, key heads, dropout_p, causal) of every call that reaches fused_attn."""
    calls = []
    real = fa_transformers.attention

    def recording(q, k, v, **keywords):
        calls.append((q.shape[1], k.shape[1], keywords["dropout_p"], keywords["causal"]))
        return real(q, k, v, **keywords)

    monkeypatch.setattr(fa_transformers, "attention", recording)
    return calls


def inputs():
    ids = torch.randint(0, VOCAB, (BATCH, SEQLEN), device=DEVICE)
    mask = torch.ones(BATCH, SEQLEN, dtype=torch.long, device=DEVICE)
    mask[1, :5] = 0  # left padding in the second sequence
    return ids, mask


def run(model, implementation, ids, mask, valid):
    """(output, {parameter name: gradient}) of a model with the given attention implementation."""
    model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == implementation
    model.zero_grad()
    result = model(input_ids=ids, attention_mask=mask)
    out = result.logits if hasattr(result, "logits") else result.last_hidden_state
    weight = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(0)).to(out.device)
    (out * weight * valid[..., None]).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_close(actual, expected, name):
    """rtol 1e-4, and atol 1e-4 of the tensor's largest magnitude: float32 roundoff in a sum over a
    batch grows with the gradient's scale (embedding gradients reach ~300 here)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale,
                               msg=lambda message: f"{name}: {message}")


def compare(model, reference, valid_only=False, spy=None):
    ids, mask = inputs()
    valid = mask.bool() if valid_only else torch.ones_like(mask, dtype=torch.bool)
    expected, expected_grads = run(model, reference, ids, mask, valid)
    out, grads = run(model, "fused_attn", ids, mask, valid)
    if spy is not None:
        assert spy, "fused_attn was not called"
    assert_close(out[valid], expected[valid], "output")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], name)


def test_bert_encoder_with_padding(spy):
    model = transformers.BertModel(transformers.BertConfig(**SMALL)).to(DEVICE).eval()
    compare(model, "sdpa", spy=spy)
    assert all(not causal for *_, causal in spy)


def test_llama_gqa_decoder_with_padding(spy):
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    compare(model, "sdpa", spy=spy)
    assert {(heads_q, heads_k) for heads_q, heads_k, *_ in spy} == {(4, 2)}, "k/v must not be repeated"


def test_mistral_sliding_window_with_padding(spy):
    config = transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=5)
    model = transformers.MistralForCausalLM(config).to(DEVICE).eval()
    compare(model, "sdpa", spy=spy)


@pytest.mark.parametrize("softcap", [None, 1.0], ids=["no-softcap", "softcap"])
def test_gemma2_sliding_window_and_softcap(spy, softcap):
    """Against eager attention. Fully masked (padding) query rows differ by design: eager spreads
    them uniformly over masked keys, fused_attn (like torch's SDPA) returns 0; only valid positions
    are compared, and nothing at a valid position depends on them."""
    config = transformers.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=5,
                                       attn_logit_softcapping=softcap, final_logit_softcapping=None)
    model = transformers.Gemma2ForCausalLM(config).to(DEVICE).eval()
    compare(model, "eager", valid_only=True, spy=spy)


def test_generation_with_kv_cache_matches_sdpa(spy):
    """Prefill (causal, padded) then one-token decoding steps against a growing cache."""
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    ids, mask = inputs()
    results = {}
    for implementation in ("sdpa", "fused_attn"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            results[implementation] = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                return_dict_in_generate=True, output_logits=True)
    assert any(heads_q == 4 for heads_q, *_ in spy)
    for expected, logits in zip(results["sdpa"].logits, results["fused_attn"].logits):
        assert_close(logits, expected, "logits")


def test_compile_fullgraph(spy):
    torch._dynamo.reset()
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    model.set_attn_implementation("fused_attn")
    ids, mask = inputs()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        compiled = torch.compile(model, fullgraph=True)(input_ids=ids, attention_mask=mask).logits
    torch._dynamo.reset()
    assert spy
    assert_close(compiled, expected, "logits")


def test_dropout_only_in_training(spy):
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, attention_dropout=0.25)
    config._attn_implementation = "fused_attn"
    model = transformers.LlamaForCausalLM(config).to(DEVICE)
    ids, mask = inputs()
    model.train()(input_ids=ids, attention_mask=mask)
    assert {dropout for _, _, dropout, _ in spy} == {0.25}
    spy.clear()
    model.eval()(input_ids=ids, attention_mask=mask)
    assert {dropout for _, _, dropout, _ in spy} == {0.0}


def test_a_batch_of_one_is_broadcast_as_sdpa_does(spy):
    """Queries of batch 1 against keys of batch B (learned queries), and the other way round: the
    attention function broadcasts the batch as transformers' SDPA function does (it had refused)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        num_key_value_groups, is_causal = 1, False

    for q_batch, kv_batch in ((1, 3), (3, 1)):
        q = torch.randn(q_batch, 4, 5, 16, device=DEVICE, requires_grad=True)
        k, v = (torch.randn(kv_batch, 4, 7, 16, device=DEVICE, requires_grad=True) for _ in range(2))
        ours, _ = fa_transformers.attention_forward(Module(), q, k, v, None)
        theirs, _ = sdpa_attention_forward(Module(), q, k, v, None)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        dout = torch.randn_like(ours)
        for a, b in zip(torch.autograd.grad(ours, (q, k, v), dout), torch.autograd.grad(theirs, (q, k, v), dout)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(spy) == 2


def test_importing_fused_attn_does_not_import_transformers():
    code = ("import sys, fused_attn, fused_attn.integrations.transformers; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), os.environ.get("PYTHONPATH")])), TRITON_INTERPRET="0")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
