"""C-LoRA's weight-delta class: the regulariser, frozen past, folding, tokens."""
import pytest
import torch

from clip_text import Tokenizer
from clora import TARGETS, CLoRA, HadamardPenalty
from conftest import rel_err, tiny_models


def setup(method="clora", rank=4):
    text, unet, _ = tiny_models()
    base_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    base_text = {k: v.clone() for k, v in text.state_dict().items()}
    return text, unet, CLoRA(unet, text, Tokenizer(), method, rank), base_unet, base_text


def known_task(adapter, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    tensors = {"tokens": torch.randn(2, 128, generator=g)}
    for name, layer in adapter.kv.items():
        out, inp = layer.weight.shape
        key = name.replace("/", ".")
        tensors[key + ".A"] = scale * torch.randn(out, adapter.rank, generator=g)
        tensors[key + ".B"] = scale * torch.randn(adapter.rank, inp, generator=g)
    return tensors


def test_adapter_adds_keys_and_renames_none():
    text, unet, adapter, base_unet, base_text = setup()
    assert set(base_unet) <= set(unet.state_dict()) and set(base_text) <= set(text.state_dict())
    assert sorted(adapter.kv) == sorted(n.replace(".", "/") for n, _ in unet.named_modules() if n.endswith(TARGETS))
    assert len(adapter.kv) == 2 * 7  # 7 transformers in the tiny UNet (2 down, 1 mid, 4 up), K and V each


def test_penalty_equals_an_explicit_computation_and_is_zero_at_task_1():
    _, _, adapter, _, _ = setup()
    adapter.start_task("<first>")
    with torch.no_grad():
        for layer in adapter.kv.values():
            layer.A.normal_()
    assert adapter.penalty().item() == 0.0  # no past yet
    adapter = setup()[2]
    past1, past2, cur = known_task(adapter, 1), known_task(adapter, 2), known_task(adapter, 3)
    adapter.load_task("<a>", past1)
    adapter.load_task("<b>", past2)
    adapter.start_task("<c>")
    with torch.no_grad():
        for name, layer in adapter.kv.items():
            layer.A.copy_(cur[name.replace("/", ".") + ".A"])
            layer.B.copy_(cur[name.replace("/", ".") + ".B"])
    expected = 0.0
    for name in adapter.kv:  # element by element, in float64, from the factors themselves
        k = name.replace("/", ".")
        past = (past1[k + ".A"].double() @ past1[k + ".B"].double()) + (past2[k + ".A"].double() @ past2[k + ".B"].double())
        new = cur[k + ".A"].double() @ cur[k + ".B"].double()
        expected += sum((abs(p) * n) ** 2 for p, n in zip(past.flatten().tolist(), new.flatten().tolist()))
    assert adapter.penalty().item() == pytest.approx(expected, rel=1e-5)
    lora = setup("lora")[2]
    lora.load_task("<a>", past1)
    lora.start_task("<c>")
    assert lora.penalty().item() == 0.0  # lambda = 0 baseline


def test_penalty_gradient_equals_autograd_of_the_formula():
    g = torch.Generator().manual_seed(0)
    A, B, P = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 3), (3, 5), (6, 5)))
    A.requires_grad_(True), B.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: HadamardPenalty.apply(a, b, P), (A, B))
    (P.abs() * (A @ B)).square().sum().backward()  # the formula, differentiated by autograd
    dA, dB = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    (3 * HadamardPenalty.apply(A, B, P)).backward()
    assert torch.allclose(A.grad, 3 * dA) and torch.allclose(B.grad, 3 * dB)


def test_training_moves_only_the_current_task():
    text, unet, adapter, base_unet, base_text = setup()
    adapter.load_task("<a>", known_task(adapter, 1))
    adapter.start_task("<b>")
    past = {n: l.past.clone() for n, l in adapter.kv.items()}
    old_rows = adapter.embedding.past.clone()
    opt = torch.optim.AdamW(adapter.trainable(), lr=1e-2, weight_decay=1e-2)
    ids = adapter.tokenizer(["a photo of <a> and <b>"])
    for _ in range(3):
        loss = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), text(ids)).square().mean() + 1e3 * adapter.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {id(p) for p in adapter.trainable()} == {id(adapter.embedding.new), *(id(p) for l in adapter.kv.values() for p in (l.A, l.B))}
    for k, v in base_unet.items():
        assert torch.equal(unet.state_dict()[k], v), k  # base weights bit-identical
    for k, v in base_text.items():
        assert torch.equal(text.state_dict()[k], v), k
    assert all(torch.equal(l.past, past[n]) for n, l in adapter.kv.items()) and torch.equal(adapter.embedding.past, old_rows)
    assert adapter.delta_norms()["total"] > 0


def test_fold_equals_unfolded_and_detach_restores_the_base():
    text, unet, adapter, base_unet, _ = setup()
    ids_plain = adapter.tokenizer(["a photo of a cat"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with torch.no_grad():
        base_out = unet(x, t, text(ids_plain))
        adapter.load_task("<a>", known_task(adapter, 1))
        adapter.start_task("<b>")
        for layer in adapter.kv.values():
            layer.A.normal_()
        ids = adapter.tokenizer(["a photo of <a> and <b>"])
        unfolded = unet(x, t, text(ids))
        adapter.fold()
        assert not any(type(m).__name__ in ("KVDelta", "ConceptEmbedding") for m in [*unet.modules(), *text.modules()])
        folded = unet(x, t, text(ids))
        assert rel_err(folded, unfolded) <= 1e-5
        assert not torch.allclose(folded, base_out, atol=1e-3)  # the deltas do something
        adapter.detach()
        assert torch.equal(unet(x, t, text(ids_plain)), base_out)
        assert all(torch.equal(v, base_unet[k]) for k, v in unet.state_dict().items())


def test_methods():
    for method, trains in (("ti", {"tokens"}), ("kv", {"tokens", "D"}), ("lora", {"tokens", "A", "B"})):
        adapter = setup(method)[2]
        adapter.start_task("<x>")
        assert {k.rsplit(".", 1)[-1] for k in adapter.task_tensors()} == trains
    with pytest.raises(ValueError, match="unknown method 'dreambooth'; choose one of clora, lora, ti, kv"):
        setup("dreambooth")


@pytest.mark.parametrize("method", ["clora", "kv", "stamina"])
def test_previous_is_the_model_before_the_current_task(method):
    """CLoRA.previous (the prior term's target): every layer without the current task's delta, the past kept."""
    text, unet, adapter, _, _ = setup(method)
    ids = adapter.tokenizer(["a photo of a cat"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with torch.no_grad():
        for word in ("<a>", "<b>"):  # a finished task in the past, then the current one
            before = unet(x, t, text(ids))
            adapter.start_task(word)
            for layer in adapter.kv.values():
                (layer.A if layer.A is not None else layer.D).normal_()
            if word == "<a>":
                adapter.finish_task()
                assert not torch.allclose(unet(x, t, text(ids)), before, atol=1e-3)  # the past acts
        now = unet(x, t, text(ids))
        with adapter.previous():
            assert torch.equal(unet(x, t, text(ids)), before)
        assert torch.equal(unet(x, t, text(ids)), now) and not torch.allclose(now, before, atol=1e-3)
