"""STAMINA (`--method stamina`, reconstructed from its abstract): the masked delta and its gradient,
hard masks and the sparsity term, MLP tokens, folding and task files, and the train.py protocol."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from checkpoint import read_state_dict, save_safetensors
from clip_text import Tokenizer
from clora import HARDENING, S_MAX, CLoRA, KVDelta, MaskedDelta, load_run, pack_bits, slope, unpack_bits
from conftest import args as train_args, crash_at_step, rel_err, snapshot, tiny_models


def setup(**kw):
    text, unet, _ = tiny_models()
    return text, unet, CLoRA(unet, text, Tokenizer(), "stamina", 4, **kw)


def randomize(adapter, seed):
    """The current task's factors, masks and token MLP at random values, so that every part counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 2 else 1.0))
        for layer in adapter.kv.values():
            layer.mask.b.copy_(torch.randn(layer.mask.b.shape, generator=g))  # some rows and entries closed


def kv_weights(unet, text):
    return {k: v.clone() for k, v in [*unet.state_dict().items(), *text.state_dict().items()] if "attn2.to_" in k or "token_emb" in k}


def unet_out(unet, text, tokenizer, prompt="a photo of <a> and <b>"):
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300])
    return unet(x, t, text(tokenizer([prompt])))


@torch.no_grad()
def test_fold_equals_unfolded_and_task_files_fold_bit_identically(tmp_path):
    text, unet, adapter = setup()
    adapter.start_task("<a>")
    randomize(adapter, 1)
    save_safetensors(adapter.task_tensors(), tmp_path / "a.safetensors")
    adapter.finish_task()
    adapter.start_task("<b>")
    randomize(adapter, 2)
    save_safetensors(adapter.task_tensors(), tmp_path / "b.safetensors")
    density = adapter.mask_density()
    assert 0.05 < density < 0.95  # the masks really gate
    unfolded = unet_out(unet, text, adapter.tokenizer)  # masks in their hard form: not training
    adapter.finish_task()  # into the past as train.py does it: the sum in the order a load makes it
    adapter.fold()
    folded_weights = kv_weights(unet, text)
    assert rel_err(unet_out(unet, text, adapter.tokenizer), unfolded) < 1e-5
    adapter.detach()
    # The files, read back into a fresh adapter (without the ablation settings: the files carry the
    # folded tokens and the binary masks), fold to the very same bits, load after load.
    for _ in range(2):
        text2, unet2, fresh = setup(mask=False, mlp_tokens=False, hardening="ste")
        for word, f in (("<a>", "a"), ("<b>", "b")):
            fresh.load_task(word, read_state_dict(tmp_path / f"{f}.safetensors"))
        fresh.fold()
        again = kv_weights(unet2, text2)
        assert folded_weights.keys() == again.keys() and all(torch.equal(folded_weights[k], again[k]) for k in again)
    b = read_state_dict(tmp_path / "b.safetensors")
    key = next(k for k in b if k.endswith(".M"))
    out, inp = b[key.replace(".M", ".A")].shape[0], b[key.replace(".M", ".B")].shape[1]
    assert b[key].dtype == torch.uint8 and b[key].numel() * 8 == out * inp  # 1 bit per entry


def test_bits_round_trip():
    m = torch.rand(16, 24, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(unpack_bits(pack_bits(m), m.shape), m)
    assert pack_bits(torch.tensor([True] + [False] * 6 + [True])).tolist() == [0b10000001]


def factors(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((6, 3), (3, 8), (6, 2), (2, 8), (6,))  # A, B, U, V, b
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True) for s in shapes]


def test_relaxed_mask_gradient_equals_autograd_of_its_formula():
    A, B, U, V, b = factors()
    s = torch.tensor(3.0, dtype=torch.float64)
    torch.autograd.gradcheck(lambda *x: MaskedDelta.apply(*x, s, False), (A, B, U, V, b))
    G = torch.randn(6, 8, dtype=torch.float64)

    def grads(out):
        (out * G).sum().backward()
        gs = [p.grad.clone() for p in (A, B, U, V, b)]
        for p in (A, B, U, V, b):
            p.grad = None
        return gs

    def formula(ste):  # the masked delta written plainly; ste: the step forward, sigmoid(s L)'s gradient backward
        L = U @ V.tanh() + b[:, None]
        relaxed = torch.sigmoid(s * L)
        return ((L > 0).double() + relaxed - relaxed.detach() if ste else relaxed) * (A @ B)

    free = torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) > 0.4  # `steer`: the entries open to the task
    torch.autograd.gradcheck(lambda *x: MaskedDelta.apply(*x, s, False, free), (A, B, U, V, b))
    for ste in (False, True):
        for F_ in (None, free):
            ours = MaskedDelta.apply(A, B, U, V, b, s, ste, F_)
            plain = formula(ste) if F_ is None else formula(ste) * F_
            assert torch.allclose(ours, plain)
            assert all(torch.allclose(x, y) for x, y in zip(grads(ours), grads(plain)))


def train_steps(adapter, unet, text, steps, rho=0.0, lr=1e-2):
    opt = torch.optim.AdamW(adapter.trainable(), lr=lr)
    ids = adapter.tokenizer(["a photo of <a>"])
    for step in range(steps):
        adapter.set_slope(slope(step, steps, adapter.hardening))
        loss = unet(torch.randn(2, 4, 8, 8), torch.tensor([500, 100]), text(ids.expand(2, -1))).square().mean()
        loss = loss + rho * adapter.sparsity()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("hardening", ["sigmoid-anneal", "ste"])
def test_masks_are_hard_at_the_end_of_training(hardening):
    text, unet, adapter = setup(hardening=hardening)
    adapter.start_task("<a>")
    steps = 5
    assert slope(steps - 1, steps, hardening) == (S_MAX if hardening == "sigmoid-anneal" else 1.0)
    assert slope(0, steps, "sigmoid-anneal") == 1 / S_MAX
    train_steps(adapter, unet, text, steps)
    for layer in adapter.kv.values():
        m = layer.mask
        assert m.relaxed and m.s.item() == slope(steps - 1, steps, hardening)
        trained = MaskedDelta.apply(layer.A, layer.B, m.U, m.V, m.b, m.s, m.ste)
        if hardening == "ste":  # the training forward is the hard mask's at every step
            assert torch.equal(trained, layer.delta())
        else:  # at the last step sigmoid(S_MAX L) is a step on all but the entries nearest L = 0
            relaxed, soft = torch.sigmoid(m.s * m.logits()), torch.sigmoid(m.logits())  # soft: slope 1, never annealed
            assert ((relaxed - layer.hard_mask().float()).abs() > 1e-3).float().mean() < 0.01
            assert ((soft - layer.hard_mask().float()).abs() > 1e-3).float().mean() > 0.5  # what the annealing changed
    adapter.set_slope(None)  # as train.py leaves them: the forward is the folded model's
    assert not any(layer.mask.relaxed for layer in adapter.kv.values())


def test_sparsity_term_is_the_mean_relaxed_mask_and_closes_entries():
    text, unet, adapter = setup()
    adapter.start_task("<a>")
    randomize(adapter, 3)
    adapter.set_slope(2.5)
    total, n = 0.0, 0
    for layer in adapter.kv.values():
        m = layer.mask
        L = m.U.double() @ m.V.double().tanh() + m.b.double()[:, None]
        total, n = total + torch.sigmoid(2.5 * L).sum().item(), n + L.numel()
    assert adapter.sparsity().item() == pytest.approx(total / n, rel=1e-6)
    densities = {}
    for rho in (0.0, 10.0):
        text, unet, adapter = setup()
        adapter.start_task("<a>")
        train_steps(adapter, unet, text, 6, rho=rho, lr=0.2)
        densities[rho] = adapter.mask_density()
    assert densities[10.0] < densities[0.0] - 0.1


@torch.no_grad()
def test_steering_masks_keep_later_tasks_off_earlier_entries(tmp_path):
    text, unet, adapter = setup(steer=True)
    adapter.start_task("<a>")
    randomize(adapter, 1)
    first = {n: layer.hard_mask().clone() for n, layer in adapter.kv.items()}
    save_safetensors(adapter.task_tensors(), tmp_path / "a.safetensors")
    after_a = adapter.taken_density()
    adapter.finish_task()
    past_a = {n: layer.past.clone() for n, layer in adapter.kv.items()}
    adapter.start_task("<b>")
    randomize(adapter, 2)  # logits that would open entries of <a>'s too, were they free
    assert any((layer.mask.logits() > 0)[first[n]].any() for n, layer in adapter.kv.items())
    for n, layer in adapter.kv.items():
        assert not (layer.hard_mask() & first[n]).any()  # ... but the hard mask keeps off them
        layer.mask.relaxed, layer.mask.s = True, torch.tensor(2.0)
        trained = MaskedDelta.apply(layer.A, layer.B, layer.mask.U, layer.mask.V, layer.mask.b, layer.mask.s,
                                    layer.mask.ste, layer.mask.free)
        assert not trained[first[n]].any()  # and so does the training form
    assert adapter.taken_density() > after_a
    adapter.finish_task()
    for n, layer in adapter.kv.items():  # task 1's entries hold exactly what task 1 wrote
        assert torch.equal(layer.past[first[n]], past_a[n][first[n]])
    # A run resumed from the files steers the same way: the taken entries come from the stored masks.
    _, _, fresh = setup(steer=True)
    fresh.load_task("<a>", read_state_dict(tmp_path / "a.safetensors"))
    assert all(torch.equal(fresh.kv[n].taken, first[n]) for n in first)


@torch.no_grad()
def test_mlp_tokens_fold_into_the_mlp_output():
    text, unet, adapter = setup()
    adapter.start_task("<a>", n_tokens=3)
    emb = adapter.embedding
    assert torch.equal(emb.current(), emb.new)  # W2 = b2 = 0 at init: the rows start as z
    randomize(adapter, 4)
    l1, l2 = emb.mlp[0], emb.mlp[2]
    expected = emb.new + F.linear(F.gelu(F.linear(emb.new, l1.weight, l1.bias)), l2.weight, l2.bias)
    assert not torch.allclose(expected, emb.new)
    assert torch.allclose(adapter.task_tensors()["tokens"], expected, rtol=0, atol=1e-7)  # what the task file stores
    adapter.fold()
    table = text.text_model.embeddings.token_embedding.weight
    assert torch.allclose(table[-3:], expected, rtol=0, atol=1e-7)
    _, _, plain = setup(mlp_tokens=False)
    plain.start_task("<a>")
    assert plain.embedding.mlp is None and plain.param_groups()["tokens"] == [plain.embedding.new]


def test_max_token_norm_bounds_the_rows_and_what_folds():
    """--max-token-norm N: rows over N are rescaled to N, rows under it kept, and the task file stores the
    rescaled rows; gradients still reach the token MLP."""
    text, unet, adapter = setup(max_token_norm=3.0)
    adapter.start_task("<a>", n_tokens=2)
    randomize(adapter, 4)
    emb = adapter.embedding
    assert emb.max_norm == 3.0
    free = emb.new + emb.mlp(emb.new)
    short, long = free.norm(dim=1).sort().indices.tolist()
    emb.max_norm = bound = free.norm(dim=1).mean().item()  # between the two rows' norms
    rows = emb.current()
    assert torch.allclose(rows[short], free[short]) and abs(rows[long].norm().item() - bound) < 1e-4
    assert torch.allclose(rows[long], free[long] * bound / free[long].norm())
    assert torch.equal(adapter.task_tensors()["tokens"], rows.detach())
    rows.sum().backward()
    assert emb.mlp[2].weight.grad is not None and emb.mlp[2].weight.grad.abs().sum() > 0
    text, unet, _ = tiny_models()
    assert setup()[2].max_token_norm is None and CLoRA(unet, text, Tokenizer(), "lora", 4, max_token_norm=3.0).max_token_norm is None


def test_ablations_change_what_trains():
    groups = setup()[2]
    groups.start_task("<a>")
    g = groups.param_groups()
    assert len(g["factors"]) == len(g["mask"]) * 2 // 3 == 2 * len(groups.kv) and len(g["tokens"]) == 5  # z, W1, b1, W2, b2
    _, _, no_mask = setup(mask=False)
    no_mask.start_task("<a>")
    assert no_mask.param_groups()["mask"] == [] and no_mask.mask_density() == 1.0
    assert all(t.all() for k, t in no_mask.task_tensors().items() if k.endswith(".M"))  # all ones: the plain product folds
    with pytest.raises(ValueError, match="unknown hardening 'gumbel'; choose one of sigmoid-anneal, ste"):
        setup(hardening="gumbel")


# ------------------------------------------------------------------------------------------------
# The train.py protocol


def args(ckpt, data, run, task, *extra):
    return train_args(ckpt, data, run, task, "--method", "stamina", *extra)


def test_three_tasks_stack_and_sample(tiny_ckpt, data, tmp_path):
    import sample

    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    train.main(args(ckpt, data, run, 3, "--mask-lr", "0.2", "--sparsity", "1"))
    desc = json.loads((run / "run.json").read_text())
    words = [w for w, _ in train.concepts(data)]
    assert [t["word"] for t in desc["tasks"]] == words
    assert (desc["method"], desc["mask"], desc["mlp_tokens"], desc["hardening"], desc["sparsity"]) == ("stamina", True, True, "sigmoid-anneal", 1.0)
    assert all(0 < t["mask_density"] < 1 and t["mask_lr"] == 0.2 for t in desc["tasks"])
    taken = [t["taken"] for t in desc["tasks"]]  # the union of the hard masks so far: it only grows
    assert taken[0] == desc["tasks"][0]["mask_density"] and taken == sorted(taken) and taken[-1] <= 1
    # Stacking: the run folds to the base weights plus every task's hard-masked product.
    files = [read_state_dict(run / f"task_0{i}.safetensors") for i in (1, 2, 3)]
    model = sample.StableDiffusion.load(ckpt)
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    assert load_run(run, model, ckpt) == words
    folded = model.unet.state_dict()
    for k, w in folded.items():
        if ".attn2.to_k." in k or ".attn2.to_v." in k:
            key = k.removesuffix(".weight")
            expected = base[k] + sum(unpack_bits(f[key + ".M"], w.shape) * (f[key + ".A"] @ f[key + ".B"]) for f in files)
            assert rel_err(w, expected) < 1e-6
        else:
            assert torch.equal(w, base[k])
    out = tmp_path / "s.png"
    sample.main(["--run", str(run), "--prompt", f"a photo of {words[0]} and {words[2]}", "--out", str(out),
                 "--steps", "2", "--n", "1", "--size", "16"])
    assert Image.open(out).size == (16, 16)


def test_crash_resumes_exactly(tiny_ckpt, data, tmp_path, monkeypatch, capsys):
    ckpt, _ = tiny_ckpt
    run, ref = tmp_path / "run", tmp_path / "ref"
    extra = ("--mask-lr", "0.2", "--hardening", "ste")
    train.main(args(ckpt, data, ref, 2, *extra))
    train.main(args(ckpt, data, run, 1, *extra))
    crash_at_step(monkeypatch, 3)  # a kill after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train.main(args(ckpt, data, run, 2, *extra))
    monkeypatch.undo()
    assert (run / "task_02.partial.safetensors").exists() and not (run / "task_02.safetensors").exists()
    capsys.readouterr()
    train.main(args(ckpt, data, run, 2, *extra))
    assert "task 2: resuming at step 2" in capsys.readouterr().out
    resumed, straight = read_state_dict(run / "task_02.safetensors"), read_state_dict(ref / "task_02.safetensors")
    assert resumed.keys() == straight.keys() and [k for k in straight if not torch.equal(resumed[k], straight[k])] == []


def test_a_run_refuses_other_settings_and_bad_values(tiny_ckpt, data, tmp_path, capsys):
    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    train.main(args(ckpt, data, run, 1))
    before = snapshot(run)
    for extra, says in [(("--method", "clora"), "made with method 'stamina', not 'clora'"),
                        (("--no-mask",), "made with mask True, not False"),
                        (("--no-mlp-tokens",), "made with mlp_tokens True, not False"),
                        (("--hardening", "ste"), "made with hardening 'sigmoid-anneal', not 'ste'"),
                        (("--sparsity", "0.5"), "made with sparsity 0.01, not 0.5"),
                        (("--steer",), "made with steer False, not True"),
                        (("--sparsity", "-1"), r"^error: --sparsity -1.0: the sparsity weight must be finite and >= 0$"),
                        (("--sparsity", "inf"), r"^error: --sparsity inf: the sparsity weight must be finite and >= 0$"),
                        (("--no-mask", "--steer"), r"^error: --steer: settings of the masks, which --no-mask turns off$"),
                        (("--lam", "10"), r"^error: --lam: C-LoRA's penalty weight; --method stamina has no penalty"),
                        (("--max-token-norm", "40"), "made with max_token_norm None, not 40.0"),
                        (("--max-token-norm", "0"), r"^error: --max-token-norm 0.0: must be finite and > 0$"),
                        (("--method", "clora", "--max-token-norm", "40"), r"^error: --max-token-norm: settings of --method stamina, not of clora$"),
                        (("--method", "lora", "--no-mask", "--sparsity", "0", "--no-steer"),
                         r"^error: --sparsity, --no-steer, --no-mask: settings of --method stamina, not of lora$")]:
        with pytest.raises(SystemExit, match=says):
            train.main(args(ckpt, data, run, 2, *extra))
        assert snapshot(run) == before
    with pytest.raises(SystemExit) as e:
        train.main(args(ckpt, data, run, 2, "--hardening", "gumbel"))
    assert e.value.code != 0 and "invalid choice: 'gumbel'" in capsys.readouterr().err
    assert snapshot(run) == before
    bounded = tmp_path / "bounded"
    train.main(args(ckpt, data, bounded, 1, "--max-token-norm", "0.5"))
    assert read_state_dict(bounded / "task_01.safetensors")["tokens"].norm(dim=1).max() <= 0.5 + 1e-6
    assert json.loads((bounded / "run.json").read_text())["max_token_norm"] == 0.5
    # A run made before --steer and --max-token-norm existed did not steer or bound, and goes on as such.
    desc = json.loads((run / "run.json").read_text())
    del desc["steer"], desc["max_token_norm"]
    (run / "run.json").write_text(json.dumps(desc))
    train.main(args(ckpt, data, run, 2))
    assert [t["task"] for t in json.loads((run / "run.json").read_text())["tasks"]] == [1, 2]


def test_task_is_stored_with_hard_masks(tiny_ckpt, data, tmp_path, monkeypatch):
    """train.py stores (and folds) a task only after switching its masks back from their training form."""
    ckpt, _ = tiny_ckpt
    seen = []
    real = train.CLoRA.task_tensors

    def spy(self):
        seen.append([layer.mask.relaxed for layer in self.kv.values()])
        return real(self)

    monkeypatch.setattr(train.CLoRA, "task_tensors", spy)
    train.main(args(ckpt, data, tmp_path / "run", 1))
    assert seen and not any(any(s) for s in seen)


@pytest.mark.parametrize("hardening", HARDENING)
def test_the_mask_is_float32_under_autocast(hardening):
    """Under a bf16 autocast (train.py's on CUDA; CPU's here) the training forward masks with the float32 L
    that the task file stores: a bf16 L flips 1[L > 0] on some entries near zero."""
    layer = KVDelta(torch.nn.Linear(320, 768, bias=False))
    layer.start("lowrank", 16, torch.Generator().manual_seed(0), hardening)
    with torch.no_grad():
        layer.A.normal_()
    layer.mask.relaxed, layer.mask.s = True, torch.tensor(S_MAX if hardening == "sigmoid-anneal" else 1.0)
    m = layer.mask
    d = MaskedDelta.apply(layer.A, layer.B, m.U, m.V, m.b, m.s, m.ste, m.free)  # float32, no autocast
    x, L32 = torch.randn(2, 7, 320), m.logits()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert ((m.logits() > 0) != (L32 > 0)).any()  # the flips the float32 forward avoids
            y = layer(x)
            expected = F.linear(x, layer.weight + layer.past.to(layer.weight.dtype)) + F.linear(x, d.to(torch.bfloat16))
    assert torch.equal(y, expected)
