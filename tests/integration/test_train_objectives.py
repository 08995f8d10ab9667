"""What each training objective optimises, on the tiny UNet (CPU, random seeded weights)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from iap_rt.errors import ConfigError  # noqa: E402
from iap_rt.train.objectives import (  # noqa: E402
    IapUNet,
    denoise_loss,
    embed_loss,
    embed_pos_loss,
    full_loss,
    pivot_loss,
    select_layers,
)


def _unet():
    from diffusers import UNet2DConditionModel

    from iap_rt.train.tiny import TINY_UNET

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval().requires_grad_(False)


def _inputs(seed: int = 1, b: int = 2, s_en: int = 77, s_zh: int = 32):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(b, 4, 8, 8, generator=g)  # (B, C, h, w)
    t = torch.tensor([10, 700][:b])  # (B,)
    en = torch.randn(b, s_en, 32, generator=g)  # (B, S_en, D)
    zh = torch.randn(b, s_zh, 32, generator=g)  # (B, S_zh, D)
    return x_t, t, en, zh


@pytest.fixture(scope="module")
def iap():
    return IapUNet(_unet())


@pytest.mark.parametrize("loss_fn", [pivot_loss, full_loss])
@pytest.mark.parametrize("normalise", [False, True])
def test_english_embeddings_on_the_chinese_side_give_zero_loss(iap, loss_fn, normalise):
    x_t, t, en, _ = _inputs()
    loss, per_layer = loss_fn(iap, x_t, t, en, en.clone(), normalise)
    assert len(per_layer) == 4
    assert loss.item() <= 1e-6


def test_captures_follow_execution_order_not_processor_order(iap):
    """The prototype bug: pairing in attn_processors order (down, up, mid) gave loss 0.40."""
    unet = iap.unet
    executed, queries = [], []
    hooks = []
    for name in iap.layers:
        attn = unet.get_submodule(name)
        hooks.append(attn.register_forward_pre_hook(lambda m, a, n=name: executed.append(n)))
        hooks.append(attn.to_q.register_forward_hook(lambda m, a, o: queries.append(o)))
    x_t, t, en, _ = _inputs()
    try:
        with torch.no_grad():
            unet(x_t, t, en)  # a plain English forward: reference order and queries
            executed_ref, queries_ref = list(executed), list(queries)
            caps = iap.capture(x_t, t, en)
    finally:
        for h in hooks:
            h.remove()
    procs = [k.removesuffix(".processor") for k in unet.attn_processors if "attn2" in k]
    assert [c.name for c in caps] == executed_ref
    assert [c.name.split(".")[0] for c in caps] == [
        "down_blocks",
        "mid_block",
        "up_blocks",
        "up_blocks",
    ]
    assert procs != executed_ref  # the trap is real in this diffusers version
    for c, q in zip(caps, queries_ref):  # the captured queries are the English pass's
        b, h, n, d = c.query.shape
        assert torch.equal(c.query, q.view(b, n, h, d).transpose(1, 2))
        assert c.attn is unet.get_submodule(c.name)


def test_pivot_first_layer_equals_the_full_pass(iap):
    """The first executed layer's queries do not depend on the text: both objectives agree."""
    x_t, t, en, zh = _inputs()
    _, pivot = pivot_loss(iap, x_t, t, en, zh)
    _, full = full_loss(iap, x_t, t, en, zh)
    assert pivot[0].item() == pytest.approx(full[0].item(), rel=1e-6)
    assert pivot[-1].item() != full[-1].item()  # later queries depend on the text


def test_pivot_gives_the_unet_no_gradient_and_leaves_it_bit_identical(iap):
    before = {k: v.clone() for k, v in iap.unet.state_dict().items()}
    x_t, t, en, zh = _inputs()
    proj = torch.nn.Linear(32, 32)
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss, _ = pivot_loss(iap, x_t, t, en, proj(zh))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in iap.unet.parameters())
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0]
    after = iap.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_full_backpropagates_through_the_frozen_unet_to_the_encoder(iap):
    x_t, t, en, zh = _inputs()
    zh.requires_grad_(True)
    loss, _ = full_loss(iap, x_t, t, en, zh)
    loss.backward()
    assert zh.grad is not None and zh.grad.abs().sum() > 0
    assert all(p.grad is None for p in iap.unet.parameters())


def test_capture_stops_after_the_last_chosen_layer():
    unet = _unet()
    iap = IapUNet(unet, "down")
    called = []
    h = unet.conv_out.register_forward_hook(lambda *a: called.append(1))
    x_t, t, en, _ = _inputs()
    caps = iap.capture(x_t, t, en)
    h.remove()
    assert [c.name.split(".")[0] for c in caps] == ["down_blocks"] and not called
    with torch.no_grad():
        unet(x_t, t, en)  # a plain forward still runs the whole UNet
    assert iap.recorder.captures == []


def test_layer_selection():
    unet = _unet()
    assert len(select_layers(unet, "all")) == 4
    assert [n.split(".")[0] for n in select_layers(unet, "up, mid")] == ["up_blocks"] * 2 + [
        "mid_block"
    ]
    assert len(select_layers(unet, "up_blocks.1.attentions.0")) == 1
    with pytest.raises(ConfigError, match="match"):
        select_layers(unet, "down,sideways")


def test_embed_pos_loss_compares_the_sequences():
    _, _, en, _ = _inputs()
    assert embed_pos_loss(en, en.clone()).item() == 0.0
    zh = en[:, :32] + 1.0  # shorter Chinese sequence: compared over its length
    assert embed_pos_loss(en, zh).item() == pytest.approx(1.0)


def test_embed_loss_sees_what_cross_attention_sees():
    """Zero for any order and for a uniform change of multiplicity (cross-attention cannot
    tell those apart), positive otherwise, and its gradient moves the Chinese set onto the
    English one."""
    g = torch.Generator().manual_seed(0)
    en = torch.randn(3, 10, 16, generator=g)
    assert embed_loss(en, en[:, torch.randperm(10, generator=g)]).item() < 1e-6
    assert embed_loss(en, torch.cat([en, en.flip(1)], 1)).item() < 1e-6  # twice as long
    assert embed_loss(en, en + 0.5).item() == pytest.approx(0.25, rel=1e-3)
    zh = torch.randn(3, 20, 16, generator=g, requires_grad=True)
    start = embed_loss(en, zh).item()
    opt = torch.optim.Adam([zh], lr=0.05)
    for _ in range(150):
        loss = embed_loss(en, zh)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * start


def test_floored_logsumexp_and_embed_loss_equal_the_unfloored_ones():
    """Flooring exponents below -80 (CPU exp is slow where it underflows) changes nothing a
    float32 sum can hold, also for arguments spread far below the floor."""
    from iap_rt.train import objectives as obj

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 9, generator=g) * 200  # many shifted exponents far below -80
    for dim in (1, 2):
        assert torch.equal(obj._logsumexp(x, dim), torch.logsumexp(x, dim))

    def unfloored(en, zh):  # embed_loss with torch.logsumexp and no floor (the reference)
        cost = torch.cdist(zh, en).pow(2)
        eps = obj.SINKHORN_EPS * cost.mean(dim=(1, 2), keepdim=True)
        log_a = -torch.log(torch.tensor(float(zh.shape[1])))
        log_b = -torch.log(torch.tensor(float(en.shape[1])))
        f, gg = torch.zeros(zh.shape[:2]), torch.zeros(en.shape[:2])
        for _ in range(obj.SINKHORN_ITERS):
            f = eps[..., 0] * (log_a - torch.logsumexp((gg[:, None, :] - cost) / eps, dim=2))
            gg = eps[..., 0] * (log_b - torch.logsumexp((f[:, :, None] - cost) / eps, dim=1))
        plan = torch.exp((f[:, :, None] + gg[:, None, :] - cost) / eps)
        return (plan * cost).sum(dim=(1, 2)).mean() / zh.shape[-1]

    en = torch.randn(3, 20, 16, generator=g)
    zh = torch.cat([en[:, :12] + 0.01 * torch.randn(3, 12, 16, generator=g),
                    torch.randn(3, 28, 16, generator=g) * 3], 1)  # fmt: skip
    assert embed_loss(en, zh).item() == pytest.approx(unfloored(en, zh).item(), rel=1e-5)


def test_denoise_loss_is_the_epsilon_loss(iap):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    x_t, t, _, zh = _inputs()
    latents, noise = torch.randn_like(x_t), torch.randn_like(x_t)
    x_t = sched.add_noise(latents, noise, t)
    with torch.no_grad():
        pred = iap.unet(x_t, t, zh).sample
    loss = denoise_loss(iap.unet, sched, latents, noise, x_t, t, zh)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, noise).item())


def test_full_with_gradient_checkpointing_gives_the_same_gradient():
    """Checkpointed blocks re-run the processors in backward; captures must not change."""
    x_t, t, en, zh = _inputs()
    grads = []
    for checkpointing in (False, True):
        unet = _unet()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        z = zh.clone().requires_grad_(True)
        loss, _ = full_loss(IapUNet(unet), x_t, t, en, z)
        loss.backward()
        grads.append(z.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    assert grads[0].abs().sum() > 0
