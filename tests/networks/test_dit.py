"""Tests for the DiffusionTransformer backbone: shapes, conditioning, MONAI inferers, errors, memory/precision options."""

from __future__ import annotations

import copy

import pytest
import torch
from einops import rearrange
from monai.inferers import DiffusionInferer, LatentDiffusionInferer
from monai.networks.nets import AutoencoderKL
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from monai_synth.networks import DiffusionTransformer
from monai_synth.networks.dit import DIT_PRESETS

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks are bound by per-op overhead: one thread avoids OpenMP hand-offs that cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(spatial_dims=2, in_channels=3, out_channels=3, input_size=8, **kwargs) -> DiffusionTransformer:
    return DiffusionTransformer(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        input_size=input_size,
        **{**TINY, **kwargs},
    )


def randomize(net: DiffusionTransformer, seed: int = 1) -> DiffusionTransformer:
    """Replace the zero-initialised adaLN-Zero and output layers by random weights, as after some training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [*[b.adaLN_modulation for b in net.blocks], net.final_layer.adaLN_modulation]:
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.1)
        head = net.final_layer.linear if net.final_layer.overlap is None else net.final_layer.overlap
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.1)
    return net


@pytest.mark.parametrize(
    "spatial_dims,input_size,patch_size",
    [(2, 16, 2), (2, (8, 16), (1, 4)), (2, 16, 8), (3, 8, 2), (3, (4, 8, 16), (2, 2, 4))],
)
def test_output_shape_and_zero_at_init(spatial_dims, input_size, patch_size):
    net = tiny(spatial_dims, in_channels=3, out_channels=2, input_size=input_size, patch_size=patch_size)
    size = (input_size,) * spatial_dims if isinstance(input_size, int) else input_size
    x = torch.randn(2, 3, *size)
    out = net(x, torch.tensor([10, 500]))
    assert out.shape == (2, 2, *size)
    # adaLN-Zero: gates and output layer start at zero, so an untrained network predicts exactly zero.
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(randomize(net)(x, torch.tensor([10, 500]))) > 0


def test_learn_sigma_doubles_output_channels():
    net = tiny(2, in_channels=4, out_channels=4, input_size=8, learn_sigma=True)
    assert net(torch.randn(1, 4, 8, 8), torch.tensor([3])).shape == (1, 8, 8, 8)


@pytest.mark.parametrize("spatial_dims,grid,patch", [(2, (4, 2), (2, 4)), (3, (2, 3, 4), (4, 2, 1))])
def test_unpatchify_inverts_row_major_patchify(spatial_dims, grid, patch):
    # Token n must land at grid position n in row-major order: the order PatchEmbed's flatten(2) emits tokens in.
    size = tuple(g * p for g, p in zip(grid, patch))
    net = tiny(spatial_dims, in_channels=1, out_channels=2, input_size=size, patch_size=patch)
    img = torch.randn(3, 2, *size)
    if spatial_dims == 2:
        tokens = rearrange(img, "b c (h p) (w q) -> b (h w) (p q c)", p=patch[0], q=patch[1])
    else:
        tokens = rearrange(img, "b c (d o) (h p) (w q) -> b (d h w) (o p q c)", o=patch[0], p=patch[1], q=patch[2])
    assert torch.equal(net.unpatchify(tokens), img)
    # and the patch embedding emits tokens in that order: a pixel change moves only its own token.
    x = torch.zeros(1, 1, *size)
    x[(0, 0, *[s - 1 for s in size])] = 1.0
    tokens = net.x_embedder(x) - net.x_embedder(torch.zeros_like(x))
    assert tokens.abs().sum(-1).squeeze(0).nonzero().flatten().tolist() == [tokens.shape[1] - 1]


def test_attention_matches_reference_multi_head_attention():
    # The qkv features of a token are laid out (3, heads, head_dim), as in the reference DiT/timm weights; heads must
    # not mix tokens or features, in the forward pass or in the gradients.
    from monai_synth.networks.dit import Attention

    torch.manual_seed(0)
    attn = Attention(hidden_size=12, num_heads=3)
    x = torch.randn(2, 5, 12, requires_grad=True)
    out = attn(x)
    q, k, v = rearrange(attn.qkv(x), "b n (three h d) -> three b h n d", three=3, h=3)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # head_dim 4: scale 1/sqrt(4)
    ref = attn.proj(rearrange(weights @ v, "b h n d -> b n (h d)"))
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(got, want)


def test_timestep_forms_broadcast_and_float_timesteps_matter():
    net = randomize(tiny(2)).eval()
    x = torch.randn(3, 3, 8, 8)
    ref = net(x, torch.full((3,), 250))
    assert torch.allclose(net(x, torch.tensor([250])), ref)
    assert torch.allclose(net(x, torch.tensor(250.0)), ref)
    assert torch.allclose(net(x, 250), ref)
    # rectified flow passes continuous times; nearby float times give nearby but different outputs.
    out_float = net(x, torch.full((3,), 250.5))
    assert not torch.allclose(out_float, ref) and torch.allclose(out_float, ref, atol=0.05)
    with pytest.raises(ValueError, match="timesteps"):
        net(x, torch.tensor([1, 2]))


def test_context_minus_one_row_is_null_condition():
    net = randomize(tiny(2, context_dim=4)).eval()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([100, 100])
    one_hot = torch.eye(4)[[1, 3]]
    cond = net(x, t, context=one_hot)
    assert torch.allclose(net(x, t, context=one_hot.unsqueeze(1)), cond)  # (B, 1, C) == (B, C)
    assert torch.allclose(net(x, t, context=one_hot.long()), cond)  # integer one-hot works too
    assert not torch.allclose(cond[0], cond[1])
    null = net(x, t, context=None)
    mixed = net(x, t, context=torch.stack([one_hot[0], -torch.ones(4)]))
    assert torch.allclose(mixed[0], cond[0]) and torch.allclose(mixed[1], null[1])
    assert not torch.allclose(null[0], cond[0])
    # -1 is only "null" for a whole row; a single -1 entry is an ordinary (continuous) value.
    partial = net(x, t, context=torch.tensor([[-1.0, 0.0, 0.0, 0.0]] * 2))
    assert not torch.allclose(partial, null)


def test_class_labels_null_class_and_dropout_in_training_only():
    net = randomize(tiny(2, num_classes=3, class_dropout_prob=0.999))
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([7, 7])
    labels = torch.tensor([0, 2])
    net.eval()
    cond = net(x, t, class_labels=labels)
    null = net(x, t)
    assert torch.allclose(net(x, t, class_labels=torch.tensor([-1, -1])), null)
    assert not torch.allclose(cond, null)
    net.train()
    torch.manual_seed(0)
    assert torch.allclose(net(x, t, class_labels=labels), null)  # dropped to the null class in training
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t, class_labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t, class_labels=torch.tensor([0.0, 1.0]))


def test_class_labels_and_context_combine():
    net = randomize(tiny(2, num_classes=2, context_dim=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([5, 5])
    labels = torch.tensor([1, 1])
    a = net(x, t, context=torch.tensor([[0.2], [0.2]]), class_labels=labels)
    b = net(x, t, context=torch.tensor([[0.9], [0.9]]), class_labels=labels)
    c = net(x, t, context=torch.tensor([[0.2], [0.2]]), class_labels=torch.tensor([0, 0]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"patch_size": 3}, "patch_size"),
        ({"input_size": 10, "patch_size": 4}, "patch_size"),
        ({"hidden_size": 30, "num_heads": 4}, "num_heads"),
        ({"input_size": (8, 8, 8)}, "input_size"),
        ({"class_dropout_prob": 1.0}, "class_dropout_prob"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


@pytest.mark.parametrize(
    "x_shape,kwargs,match",
    [
        ((2, 3, 8, 8, 8), {}, "spatial_dims"),
        ((2, 4, 8, 8), {}, "in_channels"),
        ((2, 3, 16, 16), {}, "input_size"),
        ((2, 3, 8, 8), {"context": torch.zeros(2, 5)}, "context_dim"),
        ((2, 3, 8, 8), {"class_labels": torch.tensor([0, 1])}, "num_classes"),
    ],
)
def test_forward_errors_name_the_argument(x_shape, kwargs, match):
    net = tiny(2, context_dim=4) if "class_labels" in kwargs else tiny(2, num_classes=2)
    if "context" in kwargs:
        net = tiny(2, context_dim=4)
    with pytest.raises(ValueError, match=match):
        net(torch.randn(*x_shape), torch.tensor([1, 1]), **kwargs)


def test_presets_match_dit_paper_sizes():
    assert {k: DIT_PRESETS[k]["hidden_size"] for k in ("S/2", "B/2", "L/2", "XL/2")} == {
        "S/2": 384,
        "B/2": 768,
        "L/2": 1024,
        "XL/2": 1152,
    }
    net = DiffusionTransformer.from_preset(
        "S/2", spatial_dims=2, in_channels=4, out_channels=4, input_size=32, num_classes=1000, learn_sigma=True
    )
    assert len(net.blocks) == 12 and net.num_heads == 6 and net.patch_size == (2, 2)
    # DiT-S/2 has 33M parameters (Peebles & Xie, Table 1).
    assert 32e6 < sum(p.numel() for p in net.parameters()) < 34e6
    net = DiffusionTransformer.from_preset("tiny", spatial_dims=3, in_channels=1, out_channels=1, input_size=8)
    assert net(torch.randn(1, 1, 8, 8, 8), torch.tensor([1])).shape == (1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="preset"):
        DiffusionTransformer.from_preset("M/2", spatial_dims=2, in_channels=1, out_channels=1, input_size=8)


def _scheduler(name: str):
    if name == "ddpm":
        return DDPMScheduler(num_train_timesteps=1000)
    if name == "ddim":
        return DDIMScheduler(num_train_timesteps=1000)
    return RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False)


def _train_timesteps(scheduler, latent: torch.Tensor) -> torch.Tensor:
    if isinstance(scheduler, RFlowScheduler):
        t = scheduler.sample_timesteps(latent)
        assert t.dtype.is_floating_point  # rectified flow really feeds float times
        return t
    return torch.randint(0, scheduler.num_train_timesteps, (latent.shape[0],))


def _set_steps(scheduler, n: int, latent_shape) -> None:
    if isinstance(scheduler, RFlowScheduler):
        scheduler.set_timesteps(n, input_img_size_numel=int(torch.tensor(latent_shape[2:]).prod()))
    else:
        scheduler.set_timesteps(n)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("scheduler_name", ["ddpm", "ddim", "rflow"])
def test_diffusion_inferer_train_and_cfg_sample(spatial_dims, scheduler_name):
    net = randomize(tiny(spatial_dims, in_channels=1, out_channels=1, input_size=8, context_dim=2))
    scheduler = _scheduler(scheduler_name)
    inferer = DiffusionInferer(scheduler)
    images = torch.randn(2, 1, *(8,) * spatial_dims)
    cond = torch.eye(2).unsqueeze(1)  # (B, 1, C) one-hot, as MONAI cross-attention conditioning is shaped
    noise = torch.randn_like(images)
    pred = inferer(images, net, noise, _train_timesteps(scheduler, images), condition=cond)
    assert pred.shape == images.shape
    pred.pow(2).mean().backward()
    assert net.blocks[0].attn.qkv.weight.grad is not None

    net.eval()
    _set_steps(scheduler, 3, images.shape)
    sample = inferer.sample(noise, net, scheduler=scheduler, conditioning=cond, cfg=3.0, verbose=False)
    assert sample.shape == images.shape and torch.isfinite(sample).all()
    # classifier-free guidance must actually use the condition: flipping it changes the sample.
    flipped = inferer.sample(noise, net, scheduler=scheduler, conditioning=cond.flip(0), cfg=3.0, verbose=False)
    assert not torch.allclose(sample, flipped)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("scheduler_name", ["ddpm", "ddim", "rflow"])
def test_latent_diffusion_inferer_train_and_cfg_sample(spatial_dims, scheduler_name):
    autoencoder = AutoencoderKL(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        latent_channels=3,
        num_res_blocks=1,
        attention_levels=(False, False),
        norm_num_groups=8,
    ).eval()
    net = randomize(tiny(spatial_dims, in_channels=3, out_channels=3, input_size=8, context_dim=2))
    scheduler = _scheduler(scheduler_name)
    inferer = LatentDiffusionInferer(scheduler, scale_factor=0.5)
    images = torch.randn(2, 1, *(16,) * spatial_dims)
    cond = torch.eye(2)  # (B, C)
    latent_shape = (2, 3, *(8,) * spatial_dims)
    noise = torch.randn(latent_shape)
    pred = inferer(images, autoencoder, net, noise, _train_timesteps(scheduler, noise), condition=cond)
    assert pred.shape == latent_shape

    net.eval()
    _set_steps(scheduler, 2, latent_shape)
    sample = inferer.sample(noise, autoencoder, net, scheduler=scheduler, conditioning=cond, cfg=2.0, verbose=False)
    assert sample.shape == images.shape and torch.isfinite(sample).all()


@pytest.mark.parametrize("use_context", [True, False])
def test_training_lowers_loss_and_learns_the_condition(use_context):
    # Tiny conditional problem: predict +1 everywhere for condition 0 and -1 for condition 1, from noisy inputs.
    torch.manual_seed(0)
    kwargs = {"context_dim": 2} if use_context else {"num_classes": 2}
    net = tiny(2, in_channels=1, out_channels=1, input_size=8, **kwargs)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    labels = torch.tensor([0, 1] * 4)
    target = (1 - 2 * labels.float()).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)

    def condition(lbl):
        return {"context": torch.eye(2)[lbl]} if use_context else {"class_labels": lbl}

    losses = []
    for _ in range(40):
        x = torch.randn(8, 1, 8, 8)
        t = torch.randint(0, 1000, (8,))
        loss = (net(x, t, **condition(labels)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(1.0, abs=1e-6)  # zero output at init vs targets of +-1
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0]
    net.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = net(x, torch.tensor([500, 500]), **condition(torch.tensor([0, 1])))
    assert out[0].mean() > 0.5 and out[1].mean() < -0.5


def test_checkpointing_gives_same_output_and_gradients():
    net = randomize(tiny(3, in_channels=2, out_channels=2, input_size=8, context_dim=3))
    net_ckpt = copy.deepcopy(net)
    net_ckpt.use_checkpointing = True
    x = torch.randn(2, 2, 8, 8, 8)
    t = torch.tensor([3.5, 900.0])
    ctx = torch.randn(2, 3)
    outs, grads = [], []
    for model in (net, net_ckpt):
        out = model(x, t, context=ctx)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_bf16_autocast_forward_and_backward():
    net = randomize(tiny(2, context_dim=2))
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 999])
    ctx = torch.eye(2)
    ref = net(x, t, context=ctx).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, context=ctx)
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.05, rtol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_forward_traces_without_graph_breaks():
    # torch.compile-friendliness: dynamo captures the whole conditional forward as one graph.
    net = randomize(tiny(2, context_dim=2, num_classes=2)).eval()
    x = torch.randn(2, 3, 8, 8)
    explanation = torch._dynamo.explain(net)(x, torch.tensor([1.0]), context=torch.eye(2), class_labels=None)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_the_embedders_validate_their_own_inputs():
    from monai_synth.networks.dit import ContextEmbedder, LabelEmbedder

    labels = LabelEmbedder(num_classes=3, hidden_size=8)
    assert labels(torch.tensor([0, -1, 2]), None, 3).shape == (3, 8)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\)"):
        labels(torch.tensor([0, 3]), None, 2)
    context = ContextEmbedder(context_dim=3, hidden_size=8)
    assert context(torch.eye(3).unsqueeze(1).long(), None, 3).shape == (3, 8)  # (B, 1, K) integer one-hot
    with pytest.raises(ValueError, match="context must have shape"):
        context(torch.zeros(2, 4), None, 2)


@pytest.mark.parametrize("spatial_dims,patch", [(2, 1), (2, 2), (2, 4), (3, 2), (3, 4)])
def test_overlap_head_writes_across_the_patch_border(spatial_dims, patch):
    # The DiT head writes each token into its own patch only (seams along the patch grid); the overlap head writes
    # half a patch into the neighbours. Same output shape, still exactly zero at init, and checkpoints of the default
    # head keep their keys.
    size = 2 * patch
    kwargs = {"in_channels": 1, "out_channels": 2, "input_size": size, "patch_size": patch}
    plain, overlap = tiny(spatial_dims, **kwargs), tiny(spatial_dims, overlap_head=True, **kwargs)
    x = torch.randn(2, 1, *(size,) * spatial_dims)
    assert torch.count_nonzero(overlap(x, torch.tensor([10]))) == 0
    assert randomize(overlap)(x, torch.tensor([10])).shape == (2, 2, *(size,) * spatial_dims)
    assert "final_layer.linear.weight" in plain.state_dict() and "final_layer.overlap.weight" in overlap.state_dict()
    with pytest.raises(RuntimeError, match="final_layer"):  # a checkpoint of the other head is refused, not half-loaded
        overlap.load_state_dict(plain.state_dict())

    def first_token_only(net):  # the output when only token 0 of the modulated tokens is non-zero
        tokens = torch.zeros(1, 2**spatial_dims, net.hidden_size)
        tokens[0, 0] = 1.0
        if net.final_layer.overlap is None:
            return net.unpatchify(net.final_layer.linear(tokens))
        return net.final_layer.overlap(tokens.transpose(1, 2).reshape(1, net.hidden_size, *(2,) * spatial_dims))

    for net, crosses in ((plain, False), (overlap, True)):
        out = first_token_only(randomize(net)).detach().abs()
        inside = out[(slice(None), slice(None), *[slice(0, patch)] * spatial_dims)].sum()
        assert inside > 0 and bool(out.sum() > inside) is crosses


def test_overlap_head_learns_the_condition():
    torch.manual_seed(0)
    net = tiny(2, in_channels=1, out_channels=1, input_size=8, patch_size=4, num_classes=2, overlap_head=True)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    labels = torch.tensor([0, 1] * 4)
    target = (1 - 2 * labels.float()).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    for _ in range(40):
        loss = (net(torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,)), class_labels=labels) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 1, 8, 8), torch.tensor([500, 500]), class_labels=torch.tensor([0, 1]))
    assert out[0].mean() > 0.5 and out[1].mean() < -0.5
