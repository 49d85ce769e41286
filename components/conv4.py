"""The MAML paper's Omniglot network (Finn et al. 2017, section 5.2), and which of its weights adapt.

Four blocks of [3x3 conv, 64 filters, stride 2, padding 1; batch norm; ReLU], 28 -> 14 -> 7 -> 4 -> 2,
then flatten (64 * 2 * 2 = 256) and a linear head to n_way logits. Batch norm always normalises with
the statistics of the batch it is given (transductive, as the published numbers do) and is written
with plain reduction and element-wise ops: `nn.BatchNorm2d` under `vmap(grad(...))` gives wrong
second-order gradients. Convolutions have no bias: batch norm subtracts it again.

Adapted-parameter sets (`adapted_names`):
  full  every weight is adapted in the inner loop.
  head  ANIL: only the head is adapted; the body is still meta-learned by the outer loop.
  lora  LoRA adapters on every convolution (`lora_A`, `lora_B`, `scaling = alpha / r`, peft's names)
        plus the head are adapted; the base weights and batch-norm affines are meta-learned only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ADAPT_MODES = ("full", "head", "lora")
CONV4_VERSION = "1"


@dataclass(frozen=True)
class Conv4Config:
    n_way: int = 5  # logits of the head
    in_channels: int = 1  # Omniglot is grayscale
    hidden: int = 64  # filters per convolution, as in the MAML paper
    image_size: int = 28  # side of the square input; 28 -> 2 after four stride-2 convolutions
    lora_rank: int = 0  # r of the LoRA adapter on each convolution; 0 = no adapters
    lora_alpha: float = 8.0  # scaling = lora_alpha / lora_rank, as in peft
    lora_b_std: float = 1e-3  # std of lora_B's N(0, std) start; peft's B = 0 would zero the first inner dA
    eps: float = 1e-5  # batch-norm variance floor, nn.BatchNorm2d's default

    def __post_init__(self):
        for name in ("n_way", "in_channels", "hidden", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank: must be >= 0, got {self.lora_rank}")


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise x (B, C, H, W) per channel with its own batch mean and (biased) variance, then scale and shift (C,).

    Folds everything per channel into one scale and shift: y = x * scale + shift, a single big op.
    """
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    scale = weight * torch.rsqrt(var + eps)  # (C,)
    shift = bias - mean * scale
    return torch.addcmul(shift[:, None, None], x, scale[:, None, None])


class BatchNorm(nn.Module):
    """Transductive batch norm with learnable affine weight and bias (C,); no running statistics."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return batch_norm(x, self.weight, self.bias, self.eps)


class LoraConv2d(nn.Module):
    """A frozen-in-the-inner-loop conv `base_layer` plus scaling * B @ A, merged into one kernel per call.

    lora_A (r, C_in, k, k) starts kaiming-uniform like peft's; lora_B (C_out, r) starts N(0, b_std), not
    peft's zeros: with B = 0 the inner-loop gradient with respect to A is exactly zero on the first step.
    """

    def __init__(self, base_layer: nn.Conv2d, rank: int, alpha: float, b_std: float):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = alpha / rank
        c_out, c_in, kh, kw = base_layer.weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, c_in, kh, kw))
        self.lora_B = nn.Parameter(torch.empty(c_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.normal_(self.lora_B, std=b_std)

    def merged_weight(self) -> torch.Tensor:
        """base + scaling * B @ A as a conv kernel (C_out, C_in, k, k); (T, C_out, C_in, k, k) when A or B is per task."""
        base = self.base_layer.weight
        delta = self.lora_B @ self.lora_A.flatten(-3)  # (..., C_out, C_in * k * k)
        return base + self.scaling * delta.unflatten(-1, base.shape[-3:])

    def forward(self, x):
        conv = self.base_layer
        return F.conv2d(x, self.merged_weight(), None, conv.stride, conv.padding)


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cfg: Conv4Config):
        super().__init__()
        conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.conv = LoraConv2d(conv, cfg.lora_rank, cfg.lora_alpha, cfg.lora_b_std) if cfg.lora_rank else conv
        self.norm = BatchNorm(c_out, cfg.eps)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class Conv4(nn.Module):
    """forward: images x (B, C_in, 28, 28) -> logits (B, n_way); batch norm uses this batch's statistics.

    Task-batched: x (T, B, C_in, 28, 28) -> (T, B, n_way), each task normalised on its own, with every
    weight either shared (its own shape) or one per task (T, *shape), e.g. through
    `functional_call` (what `MetaLearnerConfig(task_batched=True)` does). The T tasks run as one
    network with T * 64 channels and T-grouped convolutions, in channels-last memory format.
    """

    def __init__(self, cfg: Conv4Config = Conv4Config()):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.in_channels] + [cfg.hidden] * 4
        self.blocks = nn.Sequential(*(ConvBlock(a, b, cfg) for a, b in zip(widths[:-1], widths[1:])))
        side = cfg.image_size
        for _ in range(4):
            side = (side + 1) // 2
        self.head = nn.Linear(cfg.hidden * side * side, cfg.n_way)

    def forward(self, x):
        if x.dim() == 5:
            return self._forward_tasks(x)
        return self.head(self.blocks(x).flatten(1))

    def _forward_tasks(self, x: torch.Tensor) -> torch.Tensor:
        n_tasks, n = x.shape[:2]
        h = x.transpose(0, 1).flatten(1, 2).contiguous(memory_format=torch.channels_last)  # (B, T * C, H, W)
        for block in self.blocks:
            conv = block.conv
            weight = conv.merged_weight() if isinstance(conv, LoraConv2d) else conv.weight
            h = F.conv2d(h, _per_task(weight, n_tasks, 4).flatten(0, 1), None, 2, 1, 1, n_tasks)
            # native batch norm is exact here (no vmap): the T * 64 channels are each task's own
            h = F.batch_norm(h, None, None, _per_task(block.norm.weight, n_tasks, 1).flatten(),
                             _per_task(block.norm.bias, n_tasks, 1).flatten(), True, 0.0, self.cfg.eps)
            h = F.relu(h)
        features = h.reshape(n, n_tasks, -1).transpose(0, 1)  # (T, B, C * s * s), each image's (C, s, s) order
        return features @ self.head.weight.mT + self.head.bias.unsqueeze(-2)


def _per_task(w: torch.Tensor, n_tasks: int, ndim: int) -> torch.Tensor:
    """(T, *shape) from a weight of ndim dimensions shared by all tasks, or already one per task."""
    return w if w.dim() > ndim else w.expand(n_tasks, *w.shape)


def adapted_names(model: Conv4, mode: str) -> tuple[str, ...]:
    """Names of the parameters the inner loop adapts under `mode` (one of ADAPT_MODES), in model order."""
    names = [k for k, _ in model.named_parameters()]
    if mode == "full":
        return tuple(names)
    if mode == "head":
        return tuple(k for k in names if k.startswith("head."))
    if mode == "lora":
        if not model.cfg.lora_rank:
            raise ValueError("mode: 'lora' needs a model built with Conv4Config(lora_rank > 0)")
        return tuple(k for k in names if k.startswith("head.") or k.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))
    raise ValueError(f"mode: {mode!r} is not one of {ADAPT_MODES}")
