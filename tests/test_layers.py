"""LANet, Multi-Attention Dropping (MAD) and MSAD attention, alone and inside TransFER."""
import pytest
import timm
import torch
import torch.nn as nn

from transfer_timm.models.layers import LANet, MSADAttention, MultiAttentionDropping, drop_one_per_sample

from conftest import small_input


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)


def marked_maps(batch_size: int, num_maps: int) -> torch.Tensor:
    """Build maps ``(B, N, 1, N)`` where map ``i`` is 3 at column ``i`` and 1 elsewhere.

    After the per-pixel maximum, column ``i`` reads 3 while map ``i`` is kept and 1 when
    it is zeroed, so the output shows exactly which maps were dropped.
    """
    maps = torch.ones(batch_size, num_maps, 1, num_maps)
    for i in range(num_maps):
        maps[:, i, 0, i] = 3.0
    return maps


def dropped_map_columns(fused: torch.Tensor) -> torch.Tensor:
    """Return a bool ``(B, N)`` mask of the maps that MAD dropped, from ``marked_maps`` output."""
    return fused[:, 0, 0, :] != 3.0


def mad_drop_rate(mad, maps):
    """Return the fraction of samples with a dropped map, and the ``(B, N)`` drop mask."""
    dropped = dropped_map_columns(mad(maps))
    return dropped.any(dim=1).float().mean().item(), dropped


# ---------------------------------------------------------------- drop_one_per_sample


def test_drop_mask_shape_and_values():
    keep = drop_one_per_sample(64, 5, 1.0, torch.device('cpu'))
    assert keep.shape == (64, 5)
    assert keep.dtype == torch.float32
    assert torch.all((keep == 0) | (keep == 1))
    assert torch.all((keep == 0).sum(dim=1) == 1)


def test_drop_mask_p0_keeps_everything():
    assert torch.all(drop_one_per_sample(64, 5, 0.0, torch.device('cpu')) == 1)


# ---------------------------------------------------------------- LANet


def test_lanet_map_shape_and_range():
    lanet = LANet(64, reduction=16)
    maps = lanet(torch.randn(2, 64, 7, 7))
    assert maps.shape == (2, 1, 7, 7)
    assert torch.all((maps > 0) & (maps < 1))
    assert lanet.conv1.out_channels == 4


def test_lanet_keeps_one_channel_for_narrow_input():
    lanet = LANet(8, reduction=16)
    assert lanet.conv1.out_channels == 1
    assert lanet(torch.randn(2, 8, 3, 3)).shape == (2, 1, 3, 3)


# ---------------------------------------------------------------- MAD


@pytest.mark.parametrize('p', [-0.1, 1.5])
def test_mad_rejects_invalid_p(p):
    with pytest.raises(ValueError, match='MAD drop probability'):
        MultiAttentionDropping(p)


def test_mad_p0_is_plain_max():
    maps = torch.rand(4, 3, 5, 5)
    mad = MultiAttentionDropping(0.0).train()
    torch.testing.assert_close(mad(maps), maps.amax(dim=1, keepdim=True), rtol=0, atol=0)


def test_mad_eval_is_plain_max():
    maps = torch.rand(4, 3, 5, 5)
    mad = MultiAttentionDropping(1.0).eval()
    first = mad(maps)
    torch.testing.assert_close(first, maps.amax(dim=1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(mad(maps), first, rtol=0, atol=0)


def test_mad_p1_zeroes_exactly_one_map_per_sample():
    mad = MultiAttentionDropping(1.0).train()
    fused = mad(marked_maps(256, 4))

    assert fused.shape == (256, 1, 1, 4)
    assert torch.all((fused == 1.0) | (fused == 3.0))  # a dropped map is zeroed, not scaled
    assert torch.all(dropped_map_columns(fused).sum(dim=1) == 1)


def test_mad_single_map_drops_to_zero():
    mad = MultiAttentionDropping(1.0).train()
    fused = mad(torch.rand(8, 1, 4, 4) + 0.5)
    assert torch.all(fused == 0)


def test_mad_drop_frequency_matches_p():
    num_samples, num_maps, p = 20000, 4, 0.6
    mad = MultiAttentionDropping(p).train()

    rate, dropped = mad_drop_rate(mad, marked_maps(num_samples, num_maps))

    assert abs(rate - p) < 0.03  # standard error about 0.0035
    per_map = dropped.float().mean(dim=0)
    assert torch.all((per_map - p / num_maps).abs() < 0.03), per_map


def test_mad_keeps_dtype():
    mad = MultiAttentionDropping(1.0).train()
    assert mad(marked_maps(4, 2).double()).dtype == torch.float64


# ---------------------------------------------------------------- MSAD


def identity_proj_attention(dim: int = 16, num_heads: int = 4, msad_p: float = 1.0) -> MSADAttention:
    """MSAD attention whose output projection is the identity, so the heads stay visible."""
    attn = MSADAttention(dim, num_heads, qkv_bias=True, msad_p=msad_p)
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(dim))
        attn.proj.bias.zero_()
    return attn


def manual_heads(attn: MSADAttention, x: torch.Tensor) -> torch.Tensor:
    """Compute each head's attention output ``(B, heads, N, head_dim)`` from the same q, k and v."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / attn.head_dim ** 0.5, dim=-1)
    return weights @ v


def split_heads(attn: MSADAttention, y: torch.Tensor) -> torch.Tensor:
    B, N, C = y.shape
    return y.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)


@pytest.mark.parametrize('kwargs, message', [
    (dict(dim=10, num_heads=4), 'divisible'),
    (dict(dim=16, num_heads=4, msad_p=1.2), 'MSAD drop probability'),
])
def test_msad_rejects_invalid_args(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MSADAttention(**kwargs)


@pytest.mark.parametrize('fused', [True, False])
def test_msad_eval_equals_p0(fused):
    x = torch.randn(3, 6, 16)
    attn = MSADAttention(16, 4, msad_p=1.0).eval()
    attn.fused_attn = fused
    plain = MSADAttention(16, 4, msad_p=0.0).eval()
    plain.fused_attn = fused
    plain.load_state_dict(attn.state_dict())

    first = attn(x)

    torch.testing.assert_close(first, plain(x), rtol=0, atol=0)
    torch.testing.assert_close(attn(x), first, rtol=0, atol=0)
    torch.testing.assert_close(plain.train()(x), first, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('fused', [True, False])
def test_msad_p1_zeroes_exactly_one_head_per_sample(fused):
    x = torch.randn(64, 5, 16)
    attn = identity_proj_attention().train()
    attn.fused_attn = fused

    heads = split_heads(attn, attn(x))
    with torch.no_grad():
        expected = manual_heads(attn, x)

    zero_heads = (heads == 0).flatten(2).all(dim=2)  # (B, heads)
    assert torch.all(zero_heads.sum(dim=1) == 1)
    kept_heads = ~zero_heads
    torch.testing.assert_close(heads[kept_heads], expected.detach()[kept_heads], rtol=1e-5, atol=1e-5)


def test_msad_fused_equals_unfused_with_same_seed():
    x = torch.randn(16, 5, 16)
    attn = MSADAttention(16, 4, msad_p=0.5).train()

    torch.manual_seed(123)
    fused = attn(x)
    attn.fused_attn = False
    torch.manual_seed(123)
    unfused = attn(x)
    attn.eval()
    undropped = attn(x)

    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fused, undropped), 'no head was dropped, so the comparison checks nothing'


def test_msad_drop_frequency_matches_p():
    num_samples, num_heads, p = 20000, 4, 0.3
    attn = identity_proj_attention(num_heads=num_heads, msad_p=p).train()
    # With a single token, each head's output is its value vector, which is nonzero.
    x = torch.randn(num_samples, 1, 16)

    with torch.no_grad():
        zero_heads = (split_heads(attn, attn(x)) == 0).flatten(2).all(dim=2)

    assert torch.all(zero_heads.sum(dim=1) <= 1)
    assert abs(zero_heads.any(dim=1).float().mean().item() - p) < 0.03
    per_head = zero_heads.float().mean(dim=0)
    assert torch.all((per_head - p / num_heads).abs() < 0.03), per_head


def test_msad_gradient_skips_dropped_head_values():
    attn = identity_proj_attention(msad_p=1.0).train()
    x = torch.randn(1, 3, 16, requires_grad=True)

    heads = split_heads(attn, attn(x))
    dropped = int((heads == 0).flatten(2).all(dim=2)[0].nonzero())
    heads.sum().backward()

    value_rows = attn.qkv.weight.grad[2 * 16:].reshape(4, 4, 16)
    assert torch.all(value_rows[dropped] == 0)
    assert all(value_rows[h].abs().sum() > 0 for h in range(4) if h != dropped)


# ---------------------------------------------------------------- inside TransFER


def transfer_pair(**kwargs):
    """Return transfer_tiny with MAD and MSAD at p=1 and an identical copy with both at p=0."""
    dropping = timm.create_model('transfer_tiny', mad_p=1.0, msad_p=1.0, **kwargs)
    plain = timm.create_model('transfer_tiny', mad_p=0.0, msad_p=0.0, **kwargs)
    plain.load_state_dict(dropping.state_dict())
    with torch.no_grad():  # a nonzero classifier, so that logits depend on the features
        nn.init.normal_(dropping.head.weight)
        plain.head.weight.copy_(dropping.head.weight)
    return dropping, plain


def test_transfer_eval_ignores_mad_and_msad():
    dropping, plain = transfer_pair()
    dropping.eval()
    plain.eval()
    x = small_input(dropping, img_size=48)

    with torch.no_grad():
        first = dropping(x)
        torch.testing.assert_close(dropping(x), first, rtol=0, atol=0)
        torch.testing.assert_close(plain(x), first, rtol=0, atol=0)


def test_transfer_train_drops_only_when_enabled():
    dropping, plain = transfer_pair()
    dropping.train()
    plain.train()
    x = small_input(dropping, img_size=48)

    with torch.no_grad():
        torch.manual_seed(1)
        plain_a = plain(x)
        torch.manual_seed(2)
        plain_b = plain(x)
        torch.manual_seed(1)
        drop_a = dropping(x)
        torch.manual_seed(2)
        drop_b = dropping(x)
        torch.manual_seed(1)
        drop_a_again = dropping(x)

    torch.testing.assert_close(plain_a, plain_b, rtol=0, atol=0)
    assert not torch.allclose(drop_a, plain_a)
    assert not torch.allclose(drop_a, drop_b)
    torch.testing.assert_close(drop_a_again, drop_a, rtol=0, atol=0)


def test_transfer_mad_p1_removes_one_lanet_map():
    model = timm.create_model('transfer_tiny', mad_p=1.0, msad_p=0.0).train()
    x = small_input(model, batch_size=4, img_size=48)
    captured = {}
    model.mad.register_forward_hook(lambda module, args, output: captured.update(maps=args[0], fused=output))

    with torch.no_grad():
        model(x)

    maps, fused = captured['maps'], captured['fused']
    assert maps.shape == (4, 2, 6, 6)
    # Each sample's fused map is the other LANet's map alone, because its partner was zeroed.
    for b in range(4):
        matches = [torch.equal(fused[b, 0], maps[b, i]) for i in range(2)]
        assert sum(matches) == 1, matches
