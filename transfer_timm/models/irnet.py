"""Improved-residual (IR) face backbones: IR-18/34/50/100 and IR-SE-50.

The "improved residual" unit is the one of ArcFace (Deng et al., "ArcFace: Additive
Angular Margin Loss for Deep Face Recognition", CVPR 2019, arXiv 1801.07698, Fig. 7):
BN, 3x3 conv, PReLU, 3x3 conv with the stride, BN, and no activation after the add.
The layout (stage widths, unit counts and the embedding layer) matches the public
face.evoLVe MS-Celeb-1M checkpoints, which ``checkpoint_filter_fn`` loads as they are.
Those weights expect RGB 112x112 aligned faces scaled to [-1, 1].
"""
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import DropPath
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

__all__ = ['IRNet', 'IRUnit', 'IRStem', 'checkpoint_filter_fn']


class SqueezeExcite(nn.Module):
    """Channel attention of IR-SE units: global pool, bottleneck of 1x1 convs, sigmoid gate."""

    def __init__(self, chs: int, reduction: int = 16, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Conv2d(chs, chs // reduction, 1, bias=False, **dd)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(chs // reduction, chs, 1, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * scale.sigmoid()


class IRStem(nn.Module):
    """Input layer of IR networks: 3x3 conv (stride 1 in face.evoLVe's networks), BN, PReLU."""

    def __init__(self, in_chans: int = 3, out_chs: int = 64, stride: int = 1, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_chans, out_chs, 3, stride, 1, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        self.act = nn.PReLU(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class IRUnit(nn.Module):
    """Improved residual unit: BN, 3x3 conv, PReLU, strided 3x3 conv, BN (+ optional SE).

    The shortcut subsamples by striding when the width is unchanged and uses a strided
    1x1 conv with BN otherwise. Nothing follows the addition.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            use_se: bool = False,
            drop_path: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.bn1 = nn.BatchNorm2d(in_chs, **dd)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, 1, 1, bias=False, **dd)
        self.act = nn.PReLU(out_chs, **dd)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.se = SqueezeExcite(out_chs, **dd) if use_se else nn.Identity()
        if in_chs == out_chs:
            self.shortcut = nn.MaxPool2d(1, stride) if stride > 1 else nn.Identity()
        else:
            self.shortcut = nn.Sequential()
            self.shortcut.add_module('conv', nn.Conv2d(in_chs, out_chs, 1, stride, bias=False, **dd))
            self.shortcut.add_module('bn', nn.BatchNorm2d(out_chs, **dd))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.bn2(self.conv2(self.act(self.conv1(self.bn1(x)))))
        x = self.se(x)
        return self.drop_path(x) + shortcut


def make_ir_stages(
        in_chs: int,
        depths: Sequence[int],
        widths: Sequence[int],
        use_se: bool = False,
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
) -> nn.Sequential:
    """Build IR stages; the first unit of each stage halves the resolution."""
    total = sum(depths)
    dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    stages = []
    unit_idx = 0
    for depth, width in zip(depths, widths):
        units = []
        for i in range(depth):
            units.append(IRUnit(
                in_chs, width, stride=2 if i == 0 else 1, use_se=use_se, drop_path=dpr[unit_idx],
                device=device, dtype=dtype,
            ))
            in_chs = width
            unit_idx += 1
        stages.append(nn.Sequential(*units))
    return nn.Sequential(*stages)


class EmbeddingHead(nn.Module):
    """face.evoLVe output layer plus an optional classifier.

    BN2d, dropout, flatten, linear to ``embed_dim``, BN1d gives the face embedding (the
    ``pre_logits`` output); ``fc`` maps it to class logits when ``num_classes > 0``.
    The flatten ties the head to one feature-map size (7x7 for 112 px input).
    """

    def __init__(
            self,
            in_chs: int,
            feat_size: Tuple[int, int],
            embed_dim: int = 512,
            num_classes: int = 0,
            drop_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(in_chs, **dd)
        self.drop = nn.Dropout(drop_rate)
        self.flatten = nn.Flatten(1)
        self.embed = nn.Linear(in_chs * feat_size[0] * feat_size[1], embed_dim, **dd)
        self.embed_norm = nn.BatchNorm1d(embed_dim, **dd)
        self.fc = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        self.fc = nn.Linear(self.embed.out_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.embed_norm(self.embed(self.flatten(self.drop(self.norm(x)))))
        return x if pre_logits else self.fc(x)


class PrunedHead(nn.Module):
    """Head that ``prune_intermediate_layers`` leaves: it returns the last kept feature map.

    The embedding layer is sized for the last stage's map, so it cannot follow a pruned net.
    """

    def __init__(self):
        super().__init__()
        self.fc = nn.Identity()

    def reset(self, num_classes: int, device=None, dtype=None):
        if num_classes > 0:
            raise RuntimeError(
                f'Cannot add a {num_classes}-class classifier to a pruned IRNet because pruning removed '
                f'the embedding layer. Create the model again to classify.'
            )

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x


class IRNet(nn.Module):
    """IR face backbone with the timm model interface.

    ``forward_features`` returns the last stage's map (512 x 7 x 7 at 112 px);
    ``forward_head(pre_logits=True)`` returns the 512-d face embedding, and the classifier
    ``head.fc`` maps the embedding to ``num_classes`` logits (none when ``num_classes=0``,
    so that ``model(x)`` returns the embedding).
    """

    def __init__(
            self,
            depths: Sequence[int] = (3, 4, 14, 3),
            widths: Sequence[int] = (64, 128, 256, 512),
            stem_width: int = 64,
            use_se: bool = False,
            img_size: Union[int, Tuple[int, int]] = 112,
            in_chans: int = 3,
            num_classes: int = 0,
            embed_dim: int = 512,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            depths: Number of IR units per stage.
            widths: Output channels per stage.
            stem_width: Channels of the input layer.
            use_se: Add squeeze-excitation to every unit (IR-SE).
            img_size: Input size that the embedding layer is sized for.
            in_chans: Input channels (1 for grayscale faces).
            num_classes: Classifier outputs; 0 makes the model return the embedding.
            embed_dim: Size of the face embedding.
            drop_rate: Dropout before the embedding layer (face.evoLVe uses it there).
            drop_path_rate: Stochastic depth rate, rising linearly over the units.
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = IRStem(in_chans, stem_width, **dd)
        self.stages = make_ir_stages(stem_width, depths, widths, use_se, drop_path_rate, **dd)
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module='stem')]
        for i, width in enumerate(widths):
            self.feature_info.append(dict(num_chs=width, reduction=2 ** (i + 1), module=f'stages.{i}'))
        reduction = 2 ** len(widths)
        self.feat_size = (img_size[0] // reduction, img_size[1] // reduction)
        self.num_features = widths[-1]
        self.head_hidden_size = embed_dim
        self.head = EmbeddingHead(widths[-1], self.feat_size, embed_dim, num_classes, drop_rate, **dd)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [(r'^stages\.(\d+)\.(\d+)', None), (r'^head', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.head.reset(num_classes, device=self.stem.conv.weight.device, dtype=self.stem.conv.weight.dtype)
        self.num_classes = num_classes

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Run the network and collect feature maps.

        Index 0 is the input layer (reduction 1), indices 1-4 the stages (reductions 2-16).

        Args:
            x: Input images, ``(B, C, H, W)``.
            indices: Last n maps if an int, all if None, else the listed indices.
            norm: Unused; IR networks have no final feature norm.
            stop_early: Stop after the last requested stage.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the list of maps.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"IRNet intermediates support output_fmt='NCHW' only, got {output_fmt!r}.")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)

        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for i, stage in enumerate(stages):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if i + 1 in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self.stages = self.stages[:max_index]
        if prune_head:
            self.head = PrunedHead()
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# face.evoLVe names: `res_layer` indices 0-5 and `shortcut_layer` indices 0-1.
_RES_LAYER_NAMES = {'0': 'bn1', '1': 'conv1', '2': 'act', '3': 'conv2', '4': 'bn2', '5': 'se'}
_SHORTCUT_NAMES = {'0': 'conv', '1': 'bn'}
_FIXED_NAMES = {
    'input_layer.0': 'stem.conv',
    'input_layer.1': 'stem.bn',
    'input_layer.2': 'stem.act',
    'output_layer.0': 'head.norm',
    'output_layer.3': 'head.embed',
    'output_layer.4': 'head.embed_norm',
}


def _unit_positions(model: IRNet) -> List[Tuple[int, int]]:
    return [(s, u) for s, stage in enumerate(model.stages) for u in range(len(stage))]


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: IRNet) -> Dict[str, torch.Tensor]:
    """Map a face.evoLVe IR checkpoint (flat ``body.{i}`` keys) onto ``IRNet`` names.

    Accepts checkpoints with or without ``num_batches_tracked`` buffers and with or
    without a ``module.`` prefix (from ``DataParallel``). A checkpoint already in this
    model's names passes through. Any key that cannot be mapped, or any model tensor
    that the checkpoint lacks, raises a ``KeyError`` naming it.
    """
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    if not any(k.startswith(('input_layer.', 'body.')) for k in state_dict):
        return state_dict  # native names, e.g. a checkpoint saved from this class

    positions = _unit_positions(model)
    out = {}
    unmapped = []
    for key, value in state_dict.items():
        new_key = None
        prefix, _, leaf = key.rpartition('.')
        if prefix in _FIXED_NAMES:
            new_key = f'{_FIXED_NAMES[prefix]}.{leaf}'
        else:
            m = re.match(r'^body\.(\d+)\.(res_layer|shortcut_layer)\.(\d+)\.(.+)$', key)
            if m is not None and int(m.group(1)) < len(positions):
                stage, unit = positions[int(m.group(1))]
                names = _RES_LAYER_NAMES if m.group(2) == 'res_layer' else _SHORTCUT_NAMES
                part = names.get(m.group(3))
                if part is not None:
                    if m.group(2) == 'shortcut_layer':
                        part = f'shortcut.{part}'
                    new_key = f'stages.{stage}.{unit}.{part}.{m.group(4)}'
        if new_key is None:
            unmapped.append(key)
        else:
            out[new_key] = value
    if unmapped:
        raise KeyError(
            f'IR checkpoint has {len(unmapped)} key(s) with no counterpart in {type(model).__name__}, '
            f'for example {unmapped[:5]}. Check that the checkpoint matches the architecture '
            f'(depths {[len(s) for s in model.stages]}).'
        )

    target = model.state_dict()
    for key, tensor in target.items():
        if key.endswith('num_batches_tracked') and key not in out:
            out[key] = torch.zeros_like(tensor)
    missing = [k for k in target if k not in out and not k.startswith('head.fc.')]
    if missing:
        raise KeyError(
            f'IR checkpoint lacks {len(missing)} tensor(s) that the model needs, for example {missing[:5]}. '
            f'Check that the checkpoint matches the architecture (depths {[len(s) for s in model.stages]}).'
        )
    for key, value in out.items():
        if key not in target or target[key].shape == value.shape:
            continue
        if key == 'stem.conv.weight' and value.shape[0] == target[key].shape[0] \
                and value.shape[2:] == target[key].shape[2:]:
            continue  # only the input channels differ, and timm's load_pretrained adapts them after this filter
        raise ValueError(
            f'IR checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model expects '
            f'{tuple(target[key].shape)}. The embedding layer depends on img_size (112 for face.evoLVe).'
        )
    return out


def _create_irnet(variant: str, pretrained: bool = False, **kwargs) -> IRNet:
    return build_model_with_cfg(
        IRNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3, 4)),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 0, 'input_size': (3, 112, 112), 'pool_size': (7, 7), 'fixed_input_size': True,
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        'license': 'mit',
        'paper_ids': 'arXiv:1801.07698',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'ir18': _cfg(),
    'ir34': _cfg(),
    'ir50': _cfg(),
    'ir100': _cfg(),
    'ir_se50': _cfg(),
    'ir_tiny': _cfg(input_size=(1, 48, 48), pool_size=(6, 6), mean=(0.5,), std=(0.5,)),
})


@register_model
def ir18(pretrained: bool = False, **kwargs) -> IRNet:
    """IR-18 face backbone, stages of 2/2/2/2 units."""
    model_args = dict(depths=(2, 2, 2, 2))
    return _create_irnet('ir18', pretrained, **dict(model_args, **kwargs))


@register_model
def ir34(pretrained: bool = False, **kwargs) -> IRNet:
    """IR-34 face backbone, stages of 3/4/6/3 units."""
    model_args = dict(depths=(3, 4, 6, 3))
    return _create_irnet('ir34', pretrained, **dict(model_args, **kwargs))


@register_model
def ir50(pretrained: bool = False, **kwargs) -> IRNet:
    """IR-50 face backbone, stages of 3/4/14/3 units (the TransFER stem's source)."""
    model_args = dict(depths=(3, 4, 14, 3))
    return _create_irnet('ir50', pretrained, **dict(model_args, **kwargs))


@register_model
def ir100(pretrained: bool = False, **kwargs) -> IRNet:
    """IR-100 face backbone, stages of 3/13/30/3 units."""
    model_args = dict(depths=(3, 13, 30, 3))
    return _create_irnet('ir100', pretrained, **dict(model_args, **kwargs))


@register_model
def ir_se50(pretrained: bool = False, **kwargs) -> IRNet:
    """IR-SE-50 face backbone: IR-50 with squeeze-excitation in every unit."""
    model_args = dict(depths=(3, 4, 14, 3), use_se=True)
    return _create_irnet('ir_se50', pretrained, **dict(model_args, **kwargs))


@register_model
def ir_tiny(pretrained: bool = False, **kwargs) -> IRNet:
    """Narrow 3-stage IR network for 48x48 grayscale faces: the CNN stem of ``transfer_tiny``.

    Its stem and stages (16-channel input layer, 1/1/2 units of widths 24/48/128) match
    ``transfer_tiny`` exactly, so a trained ``ir_tiny`` initialises that model's stem
    through ``load_ir_stem``.
    """
    model_args = dict(depths=(1, 1, 2), widths=(24, 48, 128), stem_width=16, in_chans=1, img_size=48)
    return _create_irnet('ir_tiny', pretrained, **dict(model_args, **kwargs))
