"""Reusable TransFER layers: LANet, Multi-Attention Dropping and MSAD attention.

The ideas come from Xue, Wang and Guo, "TransFER: Learning Relation-aware Facial
Expression Representations with Transformers", ICCV 2021 (arXiv 2108.11116).
All random choices are made with batched tensor operations, so no layer loops over
the samples of a batch.
"""
from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['LANet', 'MultiAttentionDropping', 'MSADAttention', 'drop_one_per_sample']


def drop_one_per_sample(batch_size: int, num_choices: int, p: float, device: torch.device) -> torch.Tensor:
    """Build a keep mask that zeroes one uniformly chosen entry per sample with probability ``p``.

    Returns a float tensor of shape ``(batch_size, num_choices)`` holding ones, except
    that each sample drawn for dropping (probability ``p``, independently per sample) has
    a zero at one index chosen uniformly from ``num_choices``.
    """
    drop_sample = torch.rand(batch_size, 1, device=device) < p
    choice = torch.randint(0, num_choices, (batch_size, 1), device=device)
    one_hot = torch.arange(num_choices, device=device).unsqueeze(0) == choice
    return (~(one_hot & drop_sample)).float()


class LANet(nn.Module):
    """Local attention network: predicts one spatial attention map from a feature map.

    Two 1x1 convolutions squeeze ``in_chs`` channels to ``in_chs // reduction`` and then
    to one channel. The sigmoid output lies in (0, 1) and marks the facial regions that
    this branch attends to (TransFER, Section 3.2).
    """

    def __init__(
            self,
            in_chs: int,
            reduction: int = 16,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        mid_chs = max(1, in_chs // reduction)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(mid_chs, **dd)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid_chs, 1, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        return torch.sigmoid(self.bn2(self.conv2(x)))


class MultiAttentionDropping(nn.Module):
    """Multi-Attention Dropping (MAD) over the maps of several LANets.

    In training, each sample with probability ``p`` gets one of its ``N`` attention maps,
    chosen uniformly, set to zero, so that the network cannot rely on a single facial
    region (TransFER, Section 3.2). The maps are then fused by a per-pixel maximum.
    In evaluation nothing is dropped.

    Input: maps of shape ``(B, N, H, W)``. Output: the fused map, ``(B, 1, H, W)``.
    """

    def __init__(self, p: float = 0.6):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'MAD drop probability must lie in [0, 1], got {p}.')
        self.p = p

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0.0:
            keep = drop_one_per_sample(maps.shape[0], maps.shape[1], self.p, maps.device)
            maps = maps * keep.to(maps.dtype)[:, :, None, None]
        return maps.amax(dim=1, keepdim=True)

    def extra_repr(self) -> str:
        return f'p={self.p}'


class MSADAttention(nn.Module):
    """Multi-head self-attention with Multi-head Self-Attention Dropping (MSAD).

    In training, each sample with probability ``msad_p`` has the output of one attention
    head, chosen uniformly, set to zero before the output projection, which pushes the
    other heads to model relations between other facial parts (TransFER, Section 3.3).

    NOTE: this is the paper's description of MSAD. The authors' released code instead
    zeroes the query, key and value of one of the first 8 tokens; that variant is not
    implemented here.

    The attention itself runs through ``F.scaled_dot_product_attention``, and the head
    dropping is an exact per-head multiplication of its output, so both paths agree.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            msad_p: float = 0.3,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'Embedding dim {dim} must be divisible by num_heads {num_heads}.')
        if not 0.0 <= msad_p <= 1.0:
            raise ValueError(f'MSAD drop probability must lie in [0, 1], got {msad_p}.')
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.msad_p = msad_p
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v

        if self.training and self.msad_p > 0.0:
            keep = drop_one_per_sample(B, self.num_heads, self.msad_p, x.device)
            x = x * keep.to(x.dtype)[:, :, None, None]

        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, msad_p={self.msad_p}'


class Mlp(nn.Module):
    """Two-layer feed-forward network of a transformer block."""

    def __init__(
            self,
            dim: int,
            hidden_dim: int,
            act_layer: Type[nn.Module] = nn.GELU,
            drop: float = 0.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
