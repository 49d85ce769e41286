"""The MAML paper's Omniglot network (Finn et al. 2017, section 5.2), and which of its weights adapt.

Four blocks of [3x3 conv, 64 filters, stride 2, padding 1; batch norm; ReLU], 28 -> 14 -> 7 -> 4 -> 2,
then flatten (64 * 2 * 2 = 256) and a linear head to n_way logits. Batch norm always normalises with
the statistics of the batch it is given (transductive, as the published numbers do); it has a
learnable affine weight and bias and no running statistics. Convolutions have no bias: batch norm
subtracts it again.

Two forward paths compute the same function:
  x (B, C, H, W)     one task; batch norm from plain mean / variance ops, so it is exact under
                     `vmap(grad(...))` (`nn.BatchNorm2d` there gives wrong second-order gradients).
  x (T, B, C, H, W)  T tasks at once, every weight shared (its own shape) or per task (T, *shape);
                     what `MetaLearnerConfig(task_batched=True)` runs. The tasks become one network of
                     T * 64 channels with T-grouped convolutions, channels-last, with autograd Functions
                     whose backward is itself differentiable and fast (see `_GroupedConv`, `_BatchNorm`).
`features(x)` is the head's input on either path (what prototype heads are built from).

Adapted-parameter sets (`adapted_names`):
  full  every weight is adapted in the inner loop.
  head  ANIL: only the head is adapted; the body is still meta-learned by the outer loop.
  lora  LoRA adapters on every convolution (`lora_A`, `lora_B`, `scaling = alpha / r`, peft's names)
        plus the head are adapted; base weights and batch-norm affines are meta-learned only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ADAPT_MODES = ("full", "head", "lora")
STRIDE, PADDING = 2, 1


@dataclass(frozen=True)
class Conv4Config:
    n_way: int = 5  # logits of the head
    in_channels: int = 1  # Omniglot is grayscale
    hidden: int = 64  # filters per convolution, as in the MAML paper
    image_size: int = 28  # side of the square input; 28 -> 2 after four stride-2 convolutions
    lora_rank: int = 0  # r of the LoRA adapter on each convolution; 0 = no adapters
    lora_alpha: float = 8.0  # scaling = lora_alpha / lora_rank, as in peft
    lora_b_std: float = 1e-3  # lora_B starts N(0, std): peft's B = 0 would make the first inner dL/dA zero
    eps: float = 1e-5  # batch-norm variance floor, nn.BatchNorm2d's default

    def __post_init__(self):
        for name in ("n_way", "in_channels", "hidden", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank: must be >= 0, got {self.lora_rank}")


@dataclass(frozen=True)
class Conv4Model:
    """A family's conv4 choice; the head's ways, the input channels and the image size come from its data."""

    hidden: int = 64  # filters per convolution
    adapted: str = "full"  # the weights the inner loop adapts: one of ADAPT_MODES
    lora_rank: int = 4  # used when adapted == "lora"
    lora_alpha: float = 8.0

    def config(self, n_way: int, in_channels: int, image_size: int) -> Conv4Config:
        return Conv4Config(n_way=n_way, in_channels=in_channels, hidden=self.hidden, image_size=image_size,
                           lora_rank=self.lora_rank if self.adapted == "lora" else 0, lora_alpha=self.lora_alpha)


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise x (B, C, H, W) per channel by its own batch mean and biased variance; scale and shift (C,)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    centred = x - mean
    var = centred.square().mean((0, 2, 3), keepdim=True)  # two passes: exact, and far faster than var_mean here
    return centred * (weight[:, None, None] * torch.rsqrt(var + eps)) + bias[:, None, None]


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
    """A conv `base_layer` plus scaling * B @ A, merged into one kernel per call.

    lora_A (r, C_in, k, k) is peft's conv A kernel and starts kaiming-uniform as there; lora_B (C_out, r)
    is peft's 1x1 conv B kernel flattened. B starts N(0, lora_b_std), not at peft's zeros: with B = 0 the
    inner-loop gradient with respect to A is exactly zero, so a one-step inner loop could never move A.
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
        """base + scaling * B @ A as a kernel (C_out, C_in, k, k); (T, C_out, C_in, k, k) when A or B is per task."""
        base = self.base_layer.weight
        delta = self.lora_B @ self.lora_A.flatten(-3)  # (..., C_out, C_in * k * k)
        return base + self.scaling * delta.unflatten(-1, base.shape[-3:])

    def forward(self, x):
        return F.conv2d(x, self.merged_weight(), None, self.base_layer.stride, self.base_layer.padding)


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cfg: Conv4Config):
        super().__init__()
        conv = nn.Conv2d(c_in, c_out, 3, stride=STRIDE, padding=PADDING, bias=False)
        self.conv = LoraConv2d(conv, cfg.lora_rank, cfg.lora_alpha, cfg.lora_b_std) if cfg.lora_rank else conv
        self.norm = BatchNorm(c_out, cfg.eps)

    def kernel(self) -> torch.Tensor:
        return self.conv.merged_weight() if isinstance(self.conv, LoraConv2d) else self.conv.weight

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class Conv4(nn.Module):
    """forward: images x (B, C_in, 28, 28) -> logits (B, n_way); or x (T, B, C_in, 28, 28) -> (T, B, n_way).

    Task-batched (5-D x): each task is normalised on its own; every weight may be shared (its own
    shape) or one per task (T, *shape), e.g. swapped in through `functional_call`.
    """

    def __init__(self, cfg: Conv4Config = Conv4Config()):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.in_channels] + [cfg.hidden] * 4
        self.blocks = nn.Sequential(*(ConvBlock(a, b, cfg) for a, b in zip(widths[:-1], widths[1:])))
        side = cfg.image_size
        for _ in range(4):
            side = (side + 2 * PADDING - 3) // STRIDE + 1
        self.head = nn.Linear(cfg.hidden * side * side, cfg.n_way)

    def forward(self, x):
        if x.dim() == 5:
            return self.features(x) @ self.head.weight.mT + self.head.bias.unsqueeze(-2)  # the head may be per task
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input: x (B, C_in, H, W) -> (B, hidden * s * s); task-batched x (T, B, ...) -> (T, B, ...)."""
        if x.dim() == 5:
            return self._features_tasks(x)
        return self.blocks(x).flatten(1)

    def _features_tasks(self, x: torch.Tensor) -> torch.Tensor:
        n_tasks, n = x.shape[:2]
        h = _channels_last(x.permute(1, 3, 4, 0, 2))  # (B, T * C, H, W)
        for block in self.blocks:
            h = _GroupedConv.apply(h, _per_task(block.kernel(), n_tasks, 4).flatten(0, 1), n_tasks)
            weight, bias = (_per_task(p, n_tasks, 1).flatten() for p in (block.norm.weight, block.norm.bias))
            h = F.relu(_BatchNorm.apply(h, weight, bias, self.cfg.eps), inplace=True)
        return h.reshape(n, n_tasks, -1).transpose(0, 1)  # (T, B, C * s * s), each image's (C, s, s) order


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, W, T, C) -> (B, T * C, H, W) with channels-last strides, also when T * C == 1: there
    `.contiguous(memory_format=torch.channels_last)` gives plain strides, so oneDNN would run that convolution and
    every layer after it (batch norm too) channels-first, 1.2x slower per meta-step with one task per query graph."""
    return x.reshape(*x.shape[:3], -1).clone(memory_format=torch.contiguous_format).permute(0, 3, 1, 2)


def _per_task(w: torch.Tensor, n_tasks: int, ndim: int) -> torch.Tensor:
    """(T, *shape) from a weight of ndim dimensions shared by all tasks, or one already per task."""
    return w if w.dim() > ndim else w.expand(n_tasks, *w.shape)


def _conv_backward(grad_out, x, weight, groups: int, mask: list[bool]):
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, [STRIDE] * 2, [PADDING] * 2, [1, 1],
                                               False, [0, 0], groups, mask)


class _GroupedConv(torch.autograd.Function):
    """conv2d(x, weight, stride 2, padding 1, groups). Its backward is `_GroupedConvBackward`, whose own
    derivative calls the grouped convolution kernels: autograd's built-in conv double backward computes
    the weight term with one small convolution per group, i.e. per task."""

    @staticmethod
    def forward(ctx, x, weight, groups):
        ctx.save_for_backward(x, weight)
        ctx.groups = groups
        return F.conv2d(x, weight, None, STRIDE, PADDING, 1, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        if torch.is_grad_enabled():  # create_graph: the inner loop's gradient, differentiated again later
            grad_x, grad_w = _GroupedConvBackward.apply(grad_out, x, weight, ctx.groups, *mask[:2])
        else:
            grad_x, grad_w, _ = _conv_backward(grad_out, x, weight, ctx.groups, mask)
        return grad_x, grad_w, None


class _GroupedConvBackward(torch.autograd.Function):
    """(dL/dx, dL/dweight) of `_GroupedConv` from grad_out; linear in grad_out, in x and in weight."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, groups, need_x, need_w):
        ctx.save_for_backward(grad_out, x, weight)
        ctx.groups = groups
        ctx.set_materialize_grads(False)
        grad_x, grad_w, _ = _conv_backward(grad_out, x, weight, groups, [need_x, need_w, False])
        return grad_x, grad_w

    @staticmethod
    def backward(ctx, gg_x, gg_w):
        grad_out, x, weight = ctx.saved_tensors
        g = ctx.groups
        d_grad_out = d_x = d_w = None
        if ctx.needs_input_grad[0]:
            terms = [F.conv2d(gg_x, weight, None, STRIDE, PADDING, 1, g)] if gg_x is not None else []
            terms += [F.conv2d(x, gg_w, None, STRIDE, PADDING, 1, g)] if gg_w is not None else []
            d_grad_out = sum(terms) if terms else None
        if gg_w is not None and ctx.needs_input_grad[1]:
            d_x = _conv_backward(grad_out, x, gg_w, g, [True, False, False])[0]
        if gg_x is not None and ctx.needs_input_grad[2]:
            d_w = _conv_backward(grad_out, gg_x, weight, g, [False, True, False])[1]
        return d_grad_out, d_x, d_w, None, None, None


class _BatchNorm(torch.autograd.Function):
    """Training-mode batch norm of x (B, C, H, W) with the native fused kernels; backward `_BatchNormBackward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the inner loop's gradient, differentiated again later
            return *_BatchNormBackward.apply(grad_y, x, weight, mean, invstd, ctx.eps), None
        return *_native_bn_backward(grad_y, x, weight, mean, invstd, ctx.eps), None


def _native_bn_backward(grad_y, x, weight, mean, invstd, eps: float):
    return torch.ops.aten.native_batch_norm_backward(grad_y, x, weight, None, None, mean, invstd, True, eps,
                                                     [True, True, True])


class _BatchNormBackward(torch.autograd.Function):
    """(dL/dx, dL/dweight, dL/dbias) of `_BatchNorm` from grad_y, by the native kernel.

    Its own derivative is written out below: five whole-(B, H, W) sums and five fused multiply-adds, and
    nothing new saved. Autograd's native double backward reduces one dimension at a time, which is slow
    on channels-last tensors, and keeps several activation-sized intermediates alive. mean and invstd
    enter as constants, their dependence on x is in the formulas, so a third derivative is not available.
    """

    @staticmethod
    def forward(ctx, grad_y, x, weight, mean, invstd, eps):
        ctx.save_for_backward(grad_y, x, weight, mean, invstd)
        ctx.set_materialize_grads(False)
        return _native_bn_backward(grad_y, x, weight, mean, invstd, eps)

    @staticmethod
    def backward(ctx, gg_x, gg_weight, gg_bias):
        if torch.is_grad_enabled():
            raise RuntimeError("conv4 batch norm: third-order derivatives are not implemented")
        grad_y, x, weight, mean, rstd = ctx.saved_tensors
        dims, m = (0, 2, 3), x.numel() // x.shape[1]
        # per channel (C,): with x_hat = (x - mean) * rstd and P(v) = v - mean(v) - x_hat * mean(v * x_hat),
        # grad_x = weight * rstd * P(grad_y), grad_weight = sum(grad_y * x_hat), grad_bias = sum(grad_y).
        # Their derivatives are per-channel combinations of gg_x, grad_y, x_hat and 1, built from five sums.
        centred = x - mean[:, None, None]
        zero = torch.zeros_like(mean)
        gg_weight = zero if gg_weight is None else gg_weight
        gg_bias = zero if gg_bias is None else gg_bias
        sum_gy = grad_y.sum(dims)
        mean_gy, u = sum_gy / m, rstd * (grad_y * centred).sum(dims) / m  # u = mean(grad_y * x_hat)
        if gg_x is None:
            sum_gg = t = s = zero
        else:
            sum_gg = gg_x.sum(dims)
            t = rstd * (gg_x * centred).sum(dims)  # sum(gg_x * x_hat)
            s = (gg_x * grad_y).sum(dims) - sum_gg * mean_gy  # sum(gg_x * (grad_y - mean(grad_y)))
        mean_gg, v = sum_gg / m, t / m
        a = weight * rstd
        a2 = a * rstd
        coef_gg = -a2 * u
        coef_gy = -a2 * v + gg_weight * rstd
        coef_xhat = -a2 * (s - t * u) / m + 2 * a2 * u * v - gg_weight * rstd * u
        const = a2 * u * mean_gg + a2 * v * mean_gy - gg_weight * rstd * mean_gy
        d_x = torch.addcmul(const[:, None, None], centred, (coef_xhat * rstd)[:, None, None])
        d_x.addcmul_(grad_y, coef_gy[:, None, None])
        e = gg_weight - a * v  # coefficient of x_hat in d_grad_y
        d_grad_y = torch.addcmul((gg_bias - a * mean_gg)[:, None, None], centred, (e * rstd)[:, None, None])
        if gg_x is not None:
            d_x.addcmul_(gg_x, coef_gg[:, None, None])
            d_grad_y.addcmul_(gg_x, a[:, None, None])
        d_weight = rstd * (s - u * t)
        return d_grad_y, d_x, d_weight, None, None, None


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
