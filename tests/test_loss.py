"""The loss without the full logits: chunked (and, on a GPU, Liger's) fused linear cross-entropy equals the plain
one, with its gradients, on a tiny GPT-NeoX; evaluation's per-domain metrics are unchanged."""

from __future__ import annotations

import pytest
import torch

from cpt import loss as fused
from cpt.pythia import save_tiny_pythia

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny_pythia(str(tmp_path_factory.mktemp("loss") / "m"), seed=7, seq_len=64)


def composer_model(folder: str, impl: str, **kwargs):
    from transformers import AutoTokenizer

    from cpt.model import CptPythia

    torch.manual_seed(0)
    return CptPythia(
        tokenizer=AutoTokenizer.from_pretrained(folder, pad_token="<|padding|>"),
        pretrained_model_name_or_path=folder,
        attn_implementation="sdpa",
        use_train_metrics=False,
        loss_impl=impl,
        loss_chunk=37,  # not a divisor of the 2 x 64 tokens: the last chunk is short
        **{"pretrained": True, **kwargs},
    )


def batch() -> dict:
    ids = torch.randint(1, 50000, (2, 64), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, 50:] = -100  # padding-like tail that does not count
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_chunked_loss_and_gradients_equal_plain_on_a_tiny_gpt_neox(tiny):
    results = {}
    for impl in ("plain", "chunked"):
        model = composer_model(tiny, impl)
        model.train()
        loss = model.loss(model(batch()), batch())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (loss.detach(), grads)
    (plain, g_plain), (chunked, g_chunked) = results["plain"], results["chunked"]
    # an independent reference: HF's own loss from the full logits
    assert abs(plain.item() - chunked.item()) < TOL * plain.item()
    assert g_plain.keys() == g_chunked.keys() and len(g_plain) > 10
    for name in g_plain:
        scale = g_plain[name].abs().max().item() + 1e-12
        assert (g_plain[name] - g_chunked[name]).abs().max().item() < 1e-4 * scale, name


def test_a_batch_with_ignored_tokens_is_the_mean_over_the_tokens_that_count():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 7, -100, -100, -100]])
    logits = hidden @ weight.t()
    # by hand: positions (0,0..3) predict 2,3,4,5; (1,0) predicts 7; the rest are ignored
    picks = [(0, 0, 2), (0, 1, 3), (0, 2, 4), (0, 3, 5), (1, 0, 7)]
    expected = sum(torch.logsumexp(logits[b, t], 0) - logits[b, t, y] for b, t, y in picks) / len(picks)
    got = fused.linear_cross_entropy(hidden, weight, labels, "chunked", chunk=3)
    assert abs(got.item() - expected.item()) < TOL
    total, count = fused.cross_entropy_sum(hidden, weight, fused.shift_labels(labels), chunk=4)
    assert count.item() == 5 and abs(total.item() - expected.item() * 5) < 1e-4


def test_eval_metrics_are_unchanged(tiny):
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity

    sums = {}
    for impl in ("plain", "chunked"):
        model = composer_model(tiny, impl)
        model.eval()
        ce, ppl = LanguageCrossEntropy(), LanguagePerplexity()
        with torch.no_grad():
            out = model.eval_forward(batch())
            model.update_metric(batch(), out, ce)
            model.update_metric(batch(), out, ppl)
        sums[impl] = (ce.sum_loss.item(), ce.total_items.item(), ce.compute().item(), ppl.compute().item())
    plain, chunked = sums["plain"], sums["chunked"]
    assert plain[1] == chunked[1] == 63 + 49  # tokens that count: 63 in row 0, 49 in row 1 (labels 1..49)
    assert abs(plain[0] - chunked[0]) < 1e-4 * plain[0]
    assert abs(plain[3] - chunked[3]) < 1e-4 * plain[3]


def test_the_switch_reaches_the_model_and_bad_values_are_refused(tiny):
    with pytest.raises(ValueError, match="needs a CUDA device and liger-kernel"):
        fused.resolve("liger", "cpu")
    with pytest.raises(ValueError, match="is not one of"):
        fused.resolve("fast", "cpu")
    assert fused.resolve("auto", "cpu") == "plain"
    assert fused.resolve("auto", "cuda") == ("liger" if fused.liger_available() else "chunked")
    model = composer_model(tiny, "chunked")
    assert model.model.fused("cpu") == "chunked" and model.model.loss_chunk == 37


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_and_chunked_equal_plain_on_gpu_in_bf16(tiny):
    results = {}
    for impl in ("plain", "chunked", "liger"):
        model = composer_model(tiny, impl).cuda()
        model.train()
        b = {k: v.cuda() for k, v in batch().items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(model(b), b)
        loss.backward()
        results[impl] = loss.item()
    print(results)
    assert abs(results["chunked"] - results["plain"]) < 1e-2 and abs(results["liger"] - results["plain"]) < 1e-2


def test_a_from_scratch_model_is_built_through_llm_foundrys_from_config(tiny):
    """``cpt.from_scratch``: llm-foundry builds the model with ``from_config`` and AutoModel's keywords."""
    model = composer_model(tiny, "plain", pretrained=False, trust_remote_code=False)
    assert type(model.model).__name__ == "CptGPTNeoXForCausalLM" and model.model.config.num_hidden_layers == 2
