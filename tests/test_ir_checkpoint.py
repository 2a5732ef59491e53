"""Loading face.evoLVe IR checkpoints into ``IRNet`` and into the TransFER stem.

The checkpoints are written by reference networks built here with the module layout of
``backbone/model_irse.py`` in github.com/ZhaoJ9014/face.evoLVe: an ``input_layer``, an
``output_layer`` and a flat ``body`` of units with ``shortcut_layer`` and ``res_layer``, in
that registration order. Their state dicts therefore carry face.evoLVe's names, shapes and
key order. A key list written out by hand checks that layout, and comparing outputs checks
that every tensor lands where it computes the same thing.
"""
import pytest
import timm
import torch
import torch.nn as nn

from transfer_timm.models.transfer import load_ir_stem

IR50_DEPTHS = (3, 4, 14, 3)
IR50_WIDTHS = (64, 128, 256, 512)
BN_LEAVES = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)


class EvoSqueezeExcite(nn.Module):
    """face.evoLVe ``SEModule``: only the two bias-free 1x1 convs carry weights."""

    def __init__(self, chs: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(chs, chs // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(chs // reduction, chs, 1, bias=False)

    def forward(self, x):
        scale = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


class EvoUnit(nn.Module):
    """face.evoLVe ``bottleneck_IR`` / ``bottleneck_IR_SE``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, use_se: bool):
        super().__init__()
        if in_chs == out_chs:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        layers = [
            nn.BatchNorm2d(in_chs),
            nn.Conv2d(in_chs, out_chs, 3, 1, 1, bias=False),
            nn.PReLU(out_chs),
            nn.Conv2d(out_chs, out_chs, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_chs),
        ]
        if use_se:
            layers.append(EvoSqueezeExcite(out_chs))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class EvoBackbone(nn.Module):
    """face.evoLVe ``Backbone`` for 112x112 input, IR or IR-SE."""

    def __init__(self, depths=IR50_DEPTHS, widths=IR50_WIDTHS, use_se: bool = False):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(), nn.Flatten(), nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512),
        )
        units = []
        in_chs = 64
        for depth, width in zip(depths, widths):
            for i in range(depth):
                units.append(EvoUnit(in_chs, width, 2 if i == 0 else 1, use_se))
                in_chs = width
        self.body = nn.Sequential(*units)

    def forward(self, x):
        return self.output_layer(self.body(self.input_layer(x)))


def evolve_ir50_keys(use_se: bool = False) -> list:
    """List face.evoLVe's IR-50 state-dict keys, written out from its layout."""
    keys = ['input_layer.0.weight']
    keys += [f'input_layer.1.{leaf}' for leaf in BN_LEAVES]
    keys += ['input_layer.2.weight']
    keys += [f'output_layer.0.{leaf}' for leaf in BN_LEAVES]
    keys += ['output_layer.3.weight', 'output_layer.3.bias']
    keys += [f'output_layer.4.{leaf}' for leaf in BN_LEAVES]
    for i in range(sum(IR50_DEPTHS)):
        if i in (3, 7, 21):  # first unit of stages 2-4 changes the width
            keys += [f'body.{i}.shortcut_layer.0.weight']
            keys += [f'body.{i}.shortcut_layer.1.{leaf}' for leaf in BN_LEAVES]
        keys += [f'body.{i}.res_layer.0.{leaf}' for leaf in BN_LEAVES]
        keys += [f'body.{i}.res_layer.1.weight', f'body.{i}.res_layer.2.weight', f'body.{i}.res_layer.3.weight']
        keys += [f'body.{i}.res_layer.4.{leaf}' for leaf in BN_LEAVES]
        if use_se:
            keys += [f'body.{i}.res_layer.5.fc1.weight', f'body.{i}.res_layer.5.fc2.weight']
    return keys


def evolve_to_irnet_name(key: str) -> str:
    """Translate a face.evoLVe IR-50 key to the ``IRNet`` name, from the two layouts."""
    fixed = {
        'input_layer.0': 'stem.conv', 'input_layer.1': 'stem.bn', 'input_layer.2': 'stem.act',
        'output_layer.0': 'head.norm', 'output_layer.3': 'head.embed', 'output_layer.4': 'head.embed_norm',
    }
    res_parts = ['bn1', 'conv1', 'act', 'conv2', 'bn2', 'se']
    shortcut_parts = ['shortcut.conv', 'shortcut.bn']
    parts = key.split('.')
    if parts[0] != 'body':
        return f'{fixed[parts[0] + "." + parts[1]]}.{".".join(parts[2:])}'
    unit = int(parts[1])
    stage = 0
    while unit >= IR50_DEPTHS[stage]:
        unit -= IR50_DEPTHS[stage]
        stage += 1
    layer = res_parts if parts[2] == 'res_layer' else shortcut_parts
    return f'stages.{stage}.{unit}.{layer[int(parts[3])]}.{".".join(parts[4:])}'


def randomize_(model: nn.Module) -> nn.Module:
    """Give every tensor distinct values, with BN statistics in a usable range."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith('num_batches_tracked'):
                tensor.fill_(1000)
            elif name.endswith('running_var'):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(('running_mean', 'bias')):
                tensor.normal_(0.0, 0.1)
            elif tensor.ndim == 1 and ('.res_layer.2.' in name or name.startswith('input_layer.2.')):
                tensor.uniform_(0.0, 0.5)  # PReLU slope
            elif tensor.ndim == 1:
                tensor.uniform_(0.5, 1.5)  # BN scale
    return model.eval()


def assert_loaded(model: nn.Module, evolve_state: dict):
    """Check that each face.evoLVe tensor sits under its ``IRNet`` name, unchanged."""
    ours = model.state_dict()
    for key, value in evolve_state.items():
        torch.testing.assert_close(ours[evolve_to_irnet_name(key)], value, rtol=0, atol=0, msg=key)


@pytest.fixture(scope='module')
def evolve_ir50(tmp_path_factory):
    torch.manual_seed(1)
    reference = randomize_(EvoBackbone())
    state = reference.state_dict()
    folder = tmp_path_factory.mktemp('evolve_ir50')
    path = folder / 'backbone_ir50_ms1m.pth'
    torch.save(state, path)
    return reference, state, folder, path


def create_ir50(path, **kwargs):
    return timm.create_model('ir50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def test_reference_layout_matches_face_evolve():
    state = EvoBackbone().state_dict()
    assert list(state) == evolve_ir50_keys()
    assert state['output_layer.3.weight'].shape == (512, 512 * 7 * 7)
    assert state['body.3.shortcut_layer.0.weight'].shape == (128, 64, 1, 1)
    assert state['body.7.shortcut_layer.0.weight'].shape == (256, 128, 1, 1)
    assert state['body.21.shortcut_layer.0.weight'].shape == (512, 256, 1, 1)
    assert state['body.23.res_layer.3.weight'].shape == (512, 512, 3, 3)

    se_state = EvoBackbone(use_se=True).state_dict()
    assert list(se_state) == evolve_ir50_keys(use_se=True)
    assert se_state['body.0.res_layer.5.fc1.weight'].shape == (4, 64, 1, 1)
    assert se_state['body.23.res_layer.5.fc2.weight'].shape == (512, 32, 1, 1)


def test_ir50_load_places_tensors(evolve_ir50):
    reference, state, _, path = evolve_ir50
    model = create_ir50(path)
    assert_loaded(model, state)
    assert len(model.state_dict()) == len(state)


def test_ir50_load_matches_reference_output(evolve_ir50):
    reference, _, _, path = evolve_ir50
    model = create_ir50(path)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_ir50_load_without_num_batches_tracked(evolve_ir50):
    _, state, folder, _ = evolve_ir50
    trimmed = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    path = folder / 'no_num_batches_tracked.pth'
    torch.save(trimmed, path)

    model = create_ir50(path)

    assert_loaded(model, trimmed)
    counters = [v for k, v in model.state_dict().items() if k.endswith('num_batches_tracked')]
    assert len(counters) == sum(k.endswith('num_batches_tracked') for k in state)
    assert all(int(v) == 0 for v in counters)


def test_ir50_load_with_module_prefix(evolve_ir50):
    _, state, folder, _ = evolve_ir50
    path = folder / 'data_parallel.pth'
    torch.save({f'module.{k}': v for k, v in state.items()}, path)

    model = create_ir50(path)

    assert_loaded(model, state)


def test_ir50_missing_key_raises(evolve_ir50):
    _, state, folder, _ = evolve_ir50
    path = folder / 'missing_key.pth'
    # body.10 is the fourth unit of the third stage.
    torch.save({k: v for k, v in state.items() if k != 'body.10.res_layer.3.weight'}, path)

    with pytest.raises(KeyError, match=r'stages\.2\.3\.conv2\.weight'):
        create_ir50(path)


@pytest.mark.parametrize('extra_key', ['body.3.shortcut_layer.2.weight', 'body.24.res_layer.0.weight', 'fc.weight'])
def test_ir50_unexpected_key_raises(evolve_ir50, extra_key):
    _, state, folder, _ = evolve_ir50
    path = folder / 'unexpected_key.pth'
    torch.save({**state, extra_key: torch.zeros(4)}, path)

    with pytest.raises(KeyError, match=extra_key.replace('.', r'\.')):
        create_ir50(path)


def test_ir50_shortcut_key_on_plain_unit_raises(evolve_ir50):
    # Unit 0 keeps the width, so face.evoLVe gives it a parameter-free max-pool shortcut.
    _, state, folder, _ = evolve_ir50
    path = folder / 'extra_shortcut.pth'
    torch.save({**state, 'body.0.shortcut_layer.0.weight': torch.zeros(64, 64, 1, 1)}, path)

    with pytest.raises(RuntimeError, match=r'stages\.0\.0\.shortcut\.conv\.weight'):
        create_ir50(path)


def test_ir50_wrong_img_size_raises(evolve_ir50):
    _, _, _, path = evolve_ir50
    with pytest.raises(ValueError, match=r'head\.embed\.weight'):
        create_ir50(path, img_size=96)


def test_ir50_grayscale_load_sums_input_channels(evolve_ir50):
    _, state, _, path = evolve_ir50
    model = create_ir50(path, in_chans=1)

    expected = state['input_layer.0.weight'].sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.stem.conv.weight, expected, rtol=0, atol=1e-6)
    assert_loaded(model, {k: v for k, v in state.items() if k != 'input_layer.0.weight'})


def test_ir_se50_load_matches_reference(tmp_path):
    torch.manual_seed(2)
    reference = randomize_(EvoBackbone(use_se=True))
    state = reference.state_dict()
    path = tmp_path / 'backbone_ir50_se.pth'
    torch.save(state, path)

    model = timm.create_model('ir_se50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()

    assert_loaded(model, state)
    torch.testing.assert_close(
        model.stages[0][0].se.fc1.weight, state['body.0.res_layer.5.fc1.weight'], rtol=0, atol=0,
    )
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_load_ir_stem_from_face_evolve(evolve_ir50):
    reference, state, _, path = evolve_ir50
    model = timm.create_model('transfer_ir50').eval()
    head_before = model.blocks[0].attn.qkv.weight.clone()

    loaded = load_ir_stem(model, torch.load(path, map_location='cpu', weights_only=True))

    stem_keys = [k for k in model.state_dict() if k.startswith(('stem.', 'stages.'))]
    assert loaded == sorted(stem_keys)
    stem_state = {k: v for k, v in state.items() if k.startswith('input_layer.') or (
        k.startswith('body.') and int(k.split('.')[1]) < 21)}
    assert_loaded(model, stem_state)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, head_before, rtol=0, atol=0)

    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = reference.body[:21](reference.input_layer(x))
        actual = model.stages(model.stem(x))
    assert actual.shape == (2, 256, 14, 14)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_load_ir_stem_from_irnet_names(evolve_ir50):
    _, state, _, path = evolve_ir50
    source = create_ir50(path)
    model = timm.create_model('transfer_ir50')

    load_ir_stem(model, source.state_dict())

    target = model.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith('stem.') or key.startswith(('stages.0.', 'stages.1.', 'stages.2.')):
            torch.testing.assert_close(target[key], value, rtol=0, atol=0, msg=key)


def test_load_ir_stem_missing_unit_raises(evolve_ir50):
    _, state, _, _ = evolve_ir50
    model = timm.create_model('transfer_ir50')
    partial = {k: v for k, v in state.items() if not k.startswith('body.20.')}

    with pytest.raises(KeyError, match=r'stages\.2\.13\.'):
        load_ir_stem(model, partial)
