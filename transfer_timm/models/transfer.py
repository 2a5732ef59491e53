"""TransFER: relation-aware facial expression recognition with transformers.

Xue, Wang and Guo, "TransFER: Learning Relation-aware Facial Expression Representations
with Transformers", ICCV 2021, arXiv 2108.11116.

A face CNN stem (the first three stages of IR-50) produces a feature map. Several local
attention networks (LANets) each predict a spatial attention map; Multi-Attention
Dropping (MAD) randomly removes one map per sample in training, the maps are fused by a
per-pixel maximum and reweight the stem features. A 1x1 convolution turns every position
into a token, and a ViT encoder whose attention uses Multi-head Self-Attention Dropping
(MSAD) models the relations between the local patches. The class token feeds a linear
classifier.

``transfer_ir50`` follows the configuration of the authors' released code (112 px input,
IR-50 stem, 2 LANets, 8 blocks of width 768 with 8 heads and MLP ratio 3). The compact
variants keep the LANet/MAD/MSAD design with a smaller stem and encoder for CPU use on
native 48x48 FER+ faces.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint

from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import adapt_input_conv

from .irnet import IRStem, checkpoint_filter_fn as ir_checkpoint_filter_fn, make_ir_stages
from .layers import LANet, Mlp, MSADAttention, MultiAttentionDropping

__all__ = ['TransFER', 'TransFERBlock', 'FERPLUS_LABEL_NAMES']

# Output order of every FER+ model in this package (Barsoum et al., arXiv 1608.01041).
FERPLUS_LABEL_NAMES = ('neutral', 'happiness', 'surprise', 'sadness', 'anger', 'disgust', 'fear', 'contempt')


class TransFERBlock(nn.Module):
    """Pre-norm transformer block whose self-attention applies MSAD."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 3.0,
            qkv_bias: bool = False,
            msad_p: float = 0.3,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            norm_eps: float = 1e-6,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = MSADAttention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, msad_p=msad_p, **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class TransFER(nn.Module):
    """TransFER with the timm model interface.

    ``forward_features`` returns the normalised tokens ``(B, 1 + H*W, embed_dim)``, class
    token first. ``forward_head`` pools the class token and applies the classifier.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 112,
            in_chans: int = 3,
            num_classes: int = 8,
            global_pool: str = 'token',
            stem_width: int = 64,
            stem_stride: int = 1,
            stem_depths: Sequence[int] = (3, 4, 14),
            stem_widths: Sequence[int] = (64, 128, 256),
            num_lanets: int = 2,
            lanet_reduction: int = 16,
            mad_p: float = 0.6,
            embed_dim: int = 768,
            depth: int = 8,
            num_heads: int = 8,
            mlp_ratio: float = 3.0,
            qkv_bias: bool = False,
            msad_p: float = 0.3,
            norm_eps: float = 1e-6,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            img_size: Input size; the position embedding is sized for it.
            in_chans: Input channels (1 for grayscale faces).
            num_classes: Classifier outputs (8 FER+ expressions); 0 removes the classifier.
            global_pool: 'token' (class token, as the paper) or 'avg' (mean of patch tokens).
            stem_width: Channels of the IR input layer.
            stem_stride: Stride of the IR input layer (1 in IR-50; 2 halves the cost of small variants).
            stem_depths: IR units per stem stage; each stage halves the resolution.
            stem_widths: Output channels per stem stage.
            num_lanets: Number of LANets, N in the paper.
            lanet_reduction: Channel reduction inside each LANet.
            mad_p: Probability that MAD drops one attention map of a sample.
            embed_dim: Token width of the encoder.
            depth: Number of transformer blocks.
            num_heads: Attention heads per block.
            mlp_ratio: Hidden width of the MLP relative to ``embed_dim``.
            qkv_bias: Add a bias to the query, key and value projection.
            msad_p: Probability that MSAD drops one attention head of a sample, per block.
            norm_eps: LayerNorm epsilon.
            drop_rate: Dropout before the classifier.
            pos_drop_rate: Dropout after adding the position embedding.
            proj_drop_rate: Dropout after the attention and MLP projections.
            attn_drop_rate: Dropout of the attention weights.
            drop_path_rate: Stochastic depth rate, rising linearly over the blocks.
        """
        super().__init__()
        if global_pool not in ('token', 'avg'):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}.")
        if num_lanets < 1:
            raise ValueError(f'TransFER needs at least one LANet, got num_lanets={num_lanets}.')
        dd = dict(device=device, dtype=dtype)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        reduction = stem_stride * 2 ** len(stem_depths)
        if img_size[0] % reduction or img_size[1] % reduction:
            raise ValueError(f'img_size {img_size} must be divisible by the stem reduction {reduction}.')

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grid_size = (img_size[0] // reduction, img_size[1] // reduction)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.grad_checkpointing = False

        # CNN stem, named as in IRNet so that IR checkpoints load into it.
        self.stem = IRStem(in_chans, stem_width, stride=stem_stride, **dd)
        self.stages = make_ir_stages(stem_width, stem_depths, stem_widths, **dd)
        stem_chs = stem_widths[-1]

        # Local attention branches and MAD.
        self.lanets = nn.ModuleList([LANet(stem_chs, lanet_reduction, **dd) for _ in range(num_lanets)])
        self.mad = MultiAttentionDropping(mad_p)

        # Tokens.
        self.proj = nn.Conv2d(stem_chs, embed_dim, 1, bias=True, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # Encoder with MSAD.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            TransFERBlock(
                embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, msad_p=msad_p, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i], norm_eps=norm_eps, **dd,
            )
            for i in range(depth)
        ])
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)
        ]
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps, **dd)

        # Classifier.
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self._init_weights()

    def _init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._zero_head()

    def _zero_head(self):
        # The classifier starts at zero, so the initial logits are uniform over the classes.
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^cls_token|^pos_embed|^stem|^stages|^lanets|^proj',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('token', 'avg'):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}.")
            self.global_pool = global_pool
        dd = dict(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self._zero_head()

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Return the LANet maps ``(B, N, h, w)`` for input images, before MAD and fusion."""
        x = self.stages(self.stem(x))
        return torch.cat([lanet(x) for lanet in self.lanets], dim=1)

    def _stem_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        maps = torch.cat([lanet(x) for lanet in self.lanets], dim=1)
        x = x * self.mad(maps)
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Run the network and collect the patch tokens after transformer blocks.

        Args:
            x: Input images, ``(B, C, H, W)``.
            indices: Last n blocks if an int, all if None, else the listed block indices.
            norm: Apply the final LayerNorm to each intermediate.
            stop_early: Stop after the last requested block.
            output_fmt: 'NCHW' (patch tokens as a map) or 'NLC' (patch tokens as a sequence).
            intermediates_only: Return only the list of intermediates.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        x = self._stem_to_tokens(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                # checkpoint_seq takes a sequence of modules, not a single block.
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                y = y[:, self.num_prefix_tokens:]
                if output_fmt == 'NCHW':
                    y = y.reshape(y.shape[0], self.grid_size[0], self.grid_size[1], -1).permute(0, 3, 1, 2)
                intermediates.append(y.contiguous())

        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and norm, head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_to_tokens(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: TransFER) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to ``model``: a TransFER state dict passes through, with the
    position embedding resampled when the token grid differs."""
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    pos_embed = state_dict.get('pos_embed')
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed
        state_dict['pos_embed'] = resample_abs_pos_embed(
            pos_embed, new_size=model.grid_size, num_prefix_tokens=model.num_prefix_tokens,
        )
    return state_dict


def load_ir_stem(model: TransFER, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Load the CNN stem of ``model`` from an IR checkpoint (face.evoLVe or IRNet names).

    Only the input layer and the first ``sum(stem_depths)`` units are taken. A full IR-50
    checkpoint therefore fills the stem of ``transfer_ir50``, and its fourth stage and
    embedding layer are ignored. Returns the loaded keys. Raises ``KeyError`` naming a stem tensor
    that the checkpoint lacks.
    """
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    n_stem_units = sum(len(stage) for stage in model.stages)
    if any(k.startswith('body.') for k in state_dict):
        kept = {
            k: v for k, v in state_dict.items()
            if k.startswith('input_layer.') or (k.startswith('body.') and int(k.split('.')[1]) < n_stem_units)
        }
        state_dict = ir_checkpoint_filter_fn(kept, _StemOnly(model))
    stem_weight = state_dict.get('stem.conv.weight')
    if stem_weight is not None and stem_weight.shape[1] != model.stem.conv.in_channels:
        # Grayscale or other input: fold the RGB filters as timm does for first convs.
        state_dict = dict(state_dict, **{'stem.conv.weight': adapt_input_conv(model.stem.conv.in_channels, stem_weight)})
    loaded = {}
    for key, value in model.state_dict().items():
        if not key.startswith(('stem.', 'stages.')):
            continue
        if key in state_dict:
            loaded[key] = state_dict[key]
        elif key.endswith('num_batches_tracked'):
            loaded[key] = torch.zeros_like(value)
        else:
            raise KeyError(
                f'IR checkpoint lacks stem tensor {key!r}; it must hold at least the input layer and '
                f'the first {n_stem_units} units.'
            )
    model.load_state_dict(loaded, strict=False)
    return sorted(loaded)


class _StemOnly(nn.Module):
    """View of a model's stem and stages alone, so that the IR key mapping checks only those."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.stem = net.stem
        self.stages = net.stages


def _create_transfer(variant: str, pretrained: bool = False, **kwargs) -> TransFER:
    return build_model_with_cfg(
        TransFER, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=(-1,)),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 8, 'input_size': (3, 112, 112), 'pool_size': None, 'fixed_input_size': True,
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'stem.conv', 'classifier': 'head',
        'label_names': FERPLUS_LABEL_NAMES,
        'license': 'mit',
        'paper_ids': 'arXiv:2108.11116',
        'paper_name': 'TransFER: Learning Relation-aware Facial Expression Representations with Transformers',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'transfer_ir50': _cfg(),
    'transfer_tiny': _cfg(input_size=(1, 48, 48), mean=(0.5,), std=(0.5,)),
    # Trained on FER2013Train (FER+ majority labels) and selected on FER2013Valid; see the
    # model card in releases/transfer_tiny.ferplus for the recipe and figures.
    'transfer_tiny.ferplus': _cfg(
        hf_hub_id='transfer-timm/transfer_tiny.ferplus',
        input_size=(1, 48, 48), mean=(0.5,), std=(0.5,),
    ),
})


@register_model
def transfer_ir50(pretrained: bool = False, **kwargs) -> TransFER:
    """TransFER as configured by its authors: IR-50 stem, 2 LANets, 8 x 768-wide blocks, 112 px."""
    model_args = dict(
        img_size=112, stem_depths=(3, 4, 14), stem_widths=(64, 128, 256), num_lanets=2,
        embed_dim=768, depth=8, num_heads=8, mlp_ratio=3.0, mad_p=0.6, msad_p=0.3,
    )
    return _create_transfer('transfer_ir50', pretrained, **dict(model_args, **kwargs))


@register_model
def transfer_tiny(pretrained: bool = False, **kwargs) -> TransFER:
    """Compact TransFER for CPUs: native 48x48 grayscale faces, a 4-unit IR stem, 4 x 192-wide blocks.

    Same LANet/MAD/MSAD design as ``transfer_ir50``; the stem (widths 24/48/128 after a
    16-channel input layer, 1/1/2 units) and encoder were chosen by measured CPU speed.
    """
    model_args = dict(
        img_size=48, in_chans=1, stem_width=16, stem_depths=(1, 1, 2), stem_widths=(24, 48, 128), num_lanets=2,
        embed_dim=192, depth=4, num_heads=4, mlp_ratio=3.0, mad_p=0.6, msad_p=0.3,
    )
    return _create_transfer('transfer_tiny', pretrained, **dict(model_args, **kwargs))
