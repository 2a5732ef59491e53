"""timm model contract of every registered TransFER and IR model.

Cheap checks run for every model at ``SMALL_IMG_SIZE``. Checks that are costly for deep
models, and whose outcome does not depend on depth, run on ``ir18`` and ``transfer_tiny``.
"""
import copy
import re
import shutil

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2

from conftest import ALL_MODELS, SMALL_IMG_SIZE, TRANSFER_MODELS, create_small, small_input

# Parameter counts at the default config, measured with this package.
PARAM_COUNTS = {
    'transfer_ir50': 65_218_604,
    'transfer_tiny': 2_064_660,
    'ir18': 24_017_536,
    'ir34': 34_127_552,
    'ir50': 43_574_976,
    'ir100': 65_129_792,
    'ir_se50': 43_797_696,
    'ir_tiny': 2_908_184,
}

FERPLUS_ORDER = ('neutral', 'happiness', 'surprise', 'sadness', 'anger', 'disgust', 'fear', 'contempt')

_PRISTINE = {}


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)


@pytest.fixture(scope='module', autouse=True)
def release_model_cache():
    yield
    _PRISTINE.clear()


def small_model(name: str) -> nn.Module:
    """Return a fresh copy of a small 8-class model, building each model only once per session."""
    if name not in _PRISTINE:
        torch.manual_seed(0)
        _PRISTINE[name] = create_small(name, num_classes=8)
    return copy.deepcopy(_PRISTINE[name])


def is_transfer(name: str) -> bool:
    return name in TRANSFER_MODELS


def all_feature_indices(model: nn.Module) -> tuple:
    return tuple(range(len(model.feature_info)))


def randomize_head_(model: nn.Module) -> nn.Module:
    """Give the classifier random weights, because TransFER's starts at zero and would block backbone gradients."""
    classifier = model.get_classifier()
    if isinstance(classifier, nn.Linear):
        with torch.no_grad():
            nn.init.normal_(classifier.weight, std=0.1)
    return model


def feature_channel_dim(name: str) -> int:
    return -1 if is_transfer(name) else 1


# ---------------------------------------------------------------- registry and configs


def test_registry_lists_all_models():
    assert set(ALL_MODELS) == set(PARAM_COUNTS)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_param_count(name):
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize('name', ALL_MODELS)
def test_default_cfg_fields(name):
    cfg = timm.get_pretrained_cfg(name).to_dict()
    for field in ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'first_conv', 'classifier',
                  'license', 'paper_ids'):
        assert cfg.get(field), f'{name} default_cfg lacks {field!r}'

    channels = cfg['input_size'][0]
    assert len(cfg['mean']) == channels
    assert len(cfg['std']) == channels
    assert 0 < cfg['crop_pct'] <= 1
    assert cfg['interpolation'] in ('bilinear', 'bicubic', 'nearest')
    assert cfg['paper_ids'].startswith('arXiv:')
    if is_transfer(name):
        assert tuple(cfg['label_names']) == FERPLUS_ORDER
        assert cfg['num_classes'] == len(FERPLUS_ORDER)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_default_cfg_names_real_modules(name):
    model = small_model(name)
    cfg = model.pretrained_cfg

    first_conv = model.get_submodule(cfg['first_conv'])
    assert isinstance(first_conv, nn.Conv2d)
    assert first_conv.in_channels == model.in_chans
    classifier = model.get_submodule(cfg['classifier'])
    assert classifier is model.get_classifier()
    assert isinstance(classifier, nn.Linear)
    assert classifier.out_features == 8


def test_transfer_tiny_default_is_grayscale_48():
    model = timm.create_model('transfer_tiny')
    assert model.in_chans == 1
    assert model.pretrained_cfg['input_size'] == (1, 48, 48)
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 8)


# ---------------------------------------------------------------- forward and backward


@pytest.mark.parametrize('name', ALL_MODELS)
def test_forward_backward(name):
    model = randomize_head_(small_model(name)).train()
    x = small_input(model)

    logits = model(x)
    loss = F.cross_entropy(logits, torch.tensor([1, 5]))
    loss.backward()

    assert logits.shape == (2, 8)
    assert torch.isfinite(logits).all()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f'parameters without gradient: {no_grad[:5]}'
    bad_grad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad_grad, f'parameters with NaN or inf gradient: {bad_grad[:5]}'
    zero_grad = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero_grad, f'parameters with an all-zero gradient: {zero_grad[:5]}'


def test_transfer_ir50_forward_at_112():
    model = timm.create_model('transfer_ir50').eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 112, 112))
    assert features.shape == (1, 1 + 14 * 14, 768)
    assert torch.isfinite(features).all()


def test_ir100_forward_at_112():
    model = timm.create_model('ir100').eval()
    with torch.no_grad():
        embedding = model(torch.randn(2, 3, 112, 112))
    assert embedding.shape == (2, 512)
    assert torch.isfinite(embedding).all()


# ---------------------------------------------------------------- classifier


@pytest.mark.parametrize('name', ALL_MODELS)
def test_reset_classifier(name):
    model = small_model(name).eval()
    x = small_input(model)

    model.reset_classifier(5)
    assert model.num_classes == 5
    assert model.get_classifier().out_features == 5
    assert model(x).shape == (2, 5)

    model.reset_classifier(0)
    assert model.num_classes == 0
    assert isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        output = model(x)
    assert output.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(output, pre_logits, rtol=0, atol=0)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_num_classes_zero(name):
    model = create_small(name, num_classes=0).eval()
    x = small_input(model)

    with torch.no_grad():
        features = model.forward_features(x)
        output = model(x)
        pre_logits = model.forward_head(features, pre_logits=True)

    assert features.shape[feature_channel_dim(name)] == model.num_features
    assert output.shape == pre_logits.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(output, pre_logits, rtol=0, atol=0)


def test_transfer_avg_pool_classifier():
    model = small_model('transfer_tiny').eval()
    x = small_input(model)

    model.reset_classifier(0, global_pool='avg')
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model(x)

    torch.testing.assert_close(pooled, features[:, 1:].mean(dim=1))
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(8, global_pool='max')


# ---------------------------------------------------------------- features and intermediates


@pytest.mark.parametrize('name', ALL_MODELS)
def test_features_only(name):
    model = small_model(name)
    out_indices = all_feature_indices(model)
    features = timm.create_model(
        name, img_size=SMALL_IMG_SIZE, features_only=True, out_indices=out_indices,
    ).eval()
    x = small_input(model)

    with torch.no_grad():
        maps = features(x)

    channels = features.feature_info.channels()
    reductions = features.feature_info.reduction()
    assert len(maps) == len(out_indices)
    if is_transfer(name):
        assert channels == [model.embed_dim] * len(model.blocks)
        assert reductions == [8] * len(model.blocks)
    elif name == 'ir_tiny':
        assert channels == [16, 24, 48, 128]
        assert reductions == [1, 2, 4, 8]
    else:
        assert channels == [64, 64, 128, 256, 512]
        assert reductions == [1, 2, 4, 8, 16]
    for fmap, num_chs, reduction in zip(maps, channels, reductions):
        side = SMALL_IMG_SIZE // reduction
        assert fmap.shape == (2, num_chs, side, side)


def test_ir_features_only_at_112():
    features = timm.create_model('ir18', features_only=True, out_indices=(0, 1, 2, 3, 4)).eval()
    with torch.no_grad():
        maps = features(torch.randn(2, 3, 112, 112))

    assert features.feature_info.reduction() == [1, 2, 4, 8, 16]
    assert [tuple(m.shape[1:]) for m in maps] == [
        (64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7),
    ]


def test_transfer_features_only_default_is_last_block():
    features = timm.create_model('transfer_tiny', features_only=True)
    assert features.feature_info.channels() == [192]
    assert features.feature_info.reduction() == [8]
    assert features(torch.randn(2, 1, 48, 48))[0].shape == (2, 192, 6, 6)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_forward_intermediates(name):
    model = small_model(name).eval()
    indices = all_feature_indices(model)
    features = timm.create_model(name, img_size=SMALL_IMG_SIZE, features_only=True, out_indices=indices).eval()
    load_result = features.model.load_state_dict(model.state_dict(), strict=False)
    assert not load_result.missing_keys
    x = small_input(model)

    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        expected_final = model.forward_features(x)
        feature_maps = features(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)

    torch.testing.assert_close(final, expected_final, rtol=0, atol=0)
    assert len(intermediates) == len(indices)
    for inter, fmap in zip(intermediates, feature_maps):
        torch.testing.assert_close(inter, fmap, rtol=0, atol=0)
    for inter, expected in zip(last_two, intermediates[-2:]):
        torch.testing.assert_close(inter, expected, rtol=0, atol=0)
    for inter, expected in zip(early, intermediates[:2]):
        torch.testing.assert_close(inter, expected, rtol=0, atol=0)


def test_transfer_intermediates_formats():
    model = small_model('transfer_tiny').eval()
    x = small_input(model)

    with torch.no_grad():
        final, (nchw,) = model.forward_intermediates(x, indices=[3])
        (nlc,) = model.forward_intermediates(x, indices=[3], output_fmt='NLC', intermediates_only=True)
        (normed,) = model.forward_intermediates(x, indices=[3], output_fmt='NLC', norm=True, intermediates_only=True)

    assert nchw.shape == (2, 192, 4, 4)
    assert nlc.shape == (2, 16, 192)
    torch.testing.assert_close(nchw.flatten(2).transpose(1, 2), nlc, rtol=0, atol=0)
    torch.testing.assert_close(normed, final[:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match='output_fmt'):
        model.forward_intermediates(x, output_fmt='NHWC')


@pytest.mark.parametrize('name', ALL_MODELS)
def test_prune_intermediate_layers(name):
    model = small_model(name).eval()
    x = small_input(model)
    with torch.no_grad():
        _, reference = model.forward_intermediates(x, indices=[0, 1])

    kept_indices = model.prune_intermediate_layers([0, 1])

    assert kept_indices == [0, 1]
    assert model.num_classes == 0
    assert isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        output = model(x)
    for inter, expected in zip(pruned, reference):
        torch.testing.assert_close(inter, expected, rtol=0, atol=0)
    if is_transfer(name):
        assert len(model.blocks) == 2
        assert output.shape == (2, model.embed_dim)
    else:
        assert len(model.stages) == 1
        torch.testing.assert_close(output, reference[1], rtol=0, atol=0)  # the last kept map
        with pytest.raises(RuntimeError, match='pruned'):
            model.reset_classifier(8)


# ---------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize('name', ALL_MODELS)
def test_grad_checkpointing_forward(name):
    model = small_model(name).eval()
    x = small_input(model)
    with torch.no_grad():
        expected = model(x)

    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    output = model(x)  # grad mode on, so the checkpointed path runs

    torch.testing.assert_close(output.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['transfer_tiny', 'ir18'])
def test_grad_checkpointing_gradients(name):
    # Train mode with a fixed seed: checkpointing replays the RNG, so MAD, MSAD and
    # dropout choose the same elements when the blocks are recomputed.
    model = randomize_head_(create_small(name, num_classes=8, drop_rate=0.1, drop_path_rate=0.1)).train()
    x = small_input(model)
    target = torch.tensor([0, 3])

    def run():
        model.zero_grad()
        torch.manual_seed(7)
        out = model(x)
        F.cross_entropy(out, target).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, grads_plain = run()
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = run()

    torch.testing.assert_close(out_ckpt, out_plain, rtol=1e-5, atol=1e-6)
    for param_name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[param_name], grad, rtol=1e-4, atol=1e-6, msg=param_name)


@pytest.mark.parametrize('name', ['transfer_tiny', 'ir18'])
def test_grad_checkpointing_intermediates(name):
    model = small_model(name).eval()
    x = small_input(model).requires_grad_()

    final, intermediates = model.forward_intermediates(x)
    (final.sum() + sum(i.sum() for i in intermediates)).backward()
    grad_plain = x.grad.clone()
    x.grad = None
    model.set_grad_checkpointing(True)
    final_ckpt, intermediates_ckpt = model.forward_intermediates(x)
    (final_ckpt.sum() + sum(i.sum() for i in intermediates_ckpt)).backward()

    torch.testing.assert_close(final_ckpt, final, rtol=1e-5, atol=1e-6)
    for inter, expected in zip(intermediates_ckpt, intermediates):
        torch.testing.assert_close(inter, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, grad_plain, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- input channels and pretrained loads


@pytest.mark.parametrize('name', ALL_MODELS)
def test_grayscale_model(name):
    model = create_small(name, in_chans=1, num_classes=8).eval()
    assert model.in_chans == 1
    assert model.get_submodule(model.pretrained_cfg['first_conv']).in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, SMALL_IMG_SIZE, SMALL_IMG_SIZE)).shape == (2, 8)


@pytest.mark.parametrize('name', ['ir18', 'transfer_tiny'])
def test_pretrained_rgb_to_grayscale(name, tmp_path):
    source = create_small(name, in_chans=3)
    path = tmp_path / f'{name}_rgb.safetensors'
    save_file(source.state_dict(), str(path))
    overlay = dict(file=str(path), input_size=(3, SMALL_IMG_SIZE, SMALL_IMG_SIZE))

    model = create_small(name, pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay)

    saved = source.state_dict()
    first_conv = model.pretrained_cfg['first_conv'] + '.weight'
    assert model.state_dict()[first_conv].shape[1] == 1
    torch.testing.assert_close(
        model.state_dict()[first_conv], saved[first_conv].sum(dim=1, keepdim=True), rtol=0, atol=1e-6,
    )
    for key, value in model.state_dict().items():
        if key != first_conv:
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)


def test_pretrained_grayscale_to_rgb(tmp_path):
    source = timm.create_model('transfer_tiny')
    path = tmp_path / 'transfer_tiny_gray.safetensors'
    save_file(source.state_dict(), str(path))

    model = timm.create_model('transfer_tiny', pretrained=True, in_chans=3, pretrained_cfg_overlay=dict(file=str(path)))

    saved = source.state_dict()['stem.conv.weight']
    torch.testing.assert_close(model.stem.conv.weight, saved.repeat(1, 3, 1, 1) / 3, rtol=0, atol=1e-7)


def test_pretrained_resamples_pos_embed(tmp_path):
    source = timm.create_model('transfer_tiny')
    path = tmp_path / 'transfer_tiny_48.safetensors'
    save_file(source.state_dict(), str(path))

    model = timm.create_model(
        'transfer_tiny', pretrained=True, img_size=32, pretrained_cfg_overlay=dict(file=str(path)),
    )

    assert model.pos_embed.shape == (1, 1 + 4 * 4, 192)
    torch.testing.assert_close(model.pos_embed[:, 0], source.pos_embed[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight, rtol=0, atol=0)


# ---------------------------------------------------------------- TorchScript and torch.compile


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
@pytest.mark.parametrize('name', ALL_MODELS)
def test_torchscript(name):
    model = small_model(name).eval()
    x = small_input(model)

    scripted = torch.jit.script(model)

    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


def _find_cxx_compiler():
    return next((shutil.which(c) for c in ('g++', 'c++', 'clang++') if shutil.which(c)), None)


def test_torch_compile():
    if _find_cxx_compiler() is None:
        pytest.skip('torch.compile (Inductor) on CPU needs a C++ compiler, and none of g++, c++, clang++ is on PATH.')
    model = timm.create_model('transfer_tiny', depth=1).eval()
    x = torch.randn(2, 1, 48, 48)

    compiled = torch.compile(model)

    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- optimizer groups


def block_prefixes(name: str, model: nn.Module) -> list:
    """Return the parameter prefixes of the blocks that layer decay should order, input side first."""
    if is_transfer(name):
        return [f'blocks.{i}.' for i in range(len(model.blocks))]
    return [f'stages.{s}.{u}.' for s, stage in enumerate(model.stages) for u in range(len(stage))]


@pytest.mark.parametrize('name', ALL_MODELS)
def test_group_matcher_covers_backbone(name):
    model = small_model(name)
    for coarse in (False, True):
        matcher = model.group_matcher(coarse=coarse)
        patterns = []
        for value in matcher.values():
            patterns += [value] if isinstance(value, str) else [p for p, _ in value]
        unmatched = [
            n for n, _ in model.named_parameters()
            if not n.startswith('head') and not any(re.match(p, n) for p in patterns)
        ]
        assert not unmatched, f'coarse={coarse}: {unmatched[:5]}'


@pytest.mark.parametrize('name', ALL_MODELS)
def test_layer_decay_optimizer(name):
    model = small_model(name)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)

    group_of = {}
    for group in optimizer.param_groups:
        for p in group['params']:
            assert id(p) not in group_of, 'a parameter appears in two groups'
            group_of[id(p)] = group
    params = dict(model.named_parameters())
    assert set(group_of) == {id(p) for p in params.values()}

    no_decay = model.no_weight_decay()
    for param_name, p in params.items():
        expected = 0.0 if p.ndim <= 1 or param_name in no_decay else 0.05
        assert group_of[id(p)]['weight_decay'] == expected, param_name

    def scale(param_name):
        return group_of[id(params[param_name])]['lr_scale']

    block_scales = [scale(next(n for n in params if n.startswith(prefix))) for prefix in block_prefixes(name, model)]
    assert all(a < b for a, b in zip(block_scales, block_scales[1:])), block_scales
    assert scale('stem.conv.weight') < block_scales[0]
    classifier = model.pretrained_cfg['classifier']
    assert scale(f'{classifier}.weight') == 1.0

    randomize_head_(model).train()
    F.cross_entropy(model(small_input(model)), torch.tensor([0, 1])).backward()
    before = params['stem.conv.weight'].detach().clone()
    optimizer.step()
    assert not torch.equal(params['stem.conv.weight'], before)


def test_transfer_no_weight_decay_names():
    model = small_model('transfer_tiny')
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}


# ---------------------------------------------------------------- constructor arguments


@pytest.mark.parametrize('name', ALL_MODELS)
def test_meta_device(name):
    model = create_small(name, device='meta')
    assert all(p.device.type == 'meta' for p in model.parameters())
    assert all(b.device.type == 'meta' for b in model.buffers())


@pytest.mark.parametrize('name', ALL_MODELS)
def test_float64(name):
    model = create_small(name, dtype=torch.float64, num_classes=8).eval()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        out = model(small_input(model).double())
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('name', ALL_MODELS)
def test_drop_rates(name):
    model = create_small(name, num_classes=8, drop_rate=0.25, drop_path_rate=0.2).train()

    drop_paths = [m.drop_prob for m in model.modules() if type(m).__name__ == 'DropPath']
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drop_paths, 'drop_path_rate created no DropPath module'
    assert max(drop_paths) == pytest.approx(0.2)
    assert 0.25 in dropouts
    out = model(small_input(model))
    assert torch.isfinite(out).all()
