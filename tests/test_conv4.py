"""Conv4: shapes, transductive batch norm, LoRA start, adapted sets, and every MAML path in float64
against an independent per-task reference (hand-written forward, plain torch.autograd.grad)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from components.conv4 import (Conv4, Conv4Config, _BatchNorm, _GroupedConv, adapted_names, batch_norm)
from components.metalearners import MetaLearner, MetaLearnerConfig
from components.omniglot import EpisodeBatch

N_WAY, N_QUERY, N_TASKS = 5, 2, 3
FAST_LR = 0.4


def make_model(lora_rank: int = 0, seed: int = 0) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(Conv4Config(n_way=N_WAY, lora_rank=lora_rank, lora_b_std=0.05)).double()


@pytest.fixture(scope="module")
def episodes(random_episodes) -> EpisodeBatch:
    """3 tasks, 5-way 1-shot, 2 queries per class, random 28 x 28 images in [0, 1], float64."""
    return random_episodes(N_TASKS, N_WAY, N_QUERY)


def reference_forward(w: dict[str, torch.Tensor], x: torch.Tensor, scaling: float = 0.0) -> torch.Tensor:
    """Conv4 written out: 4 x [conv s2 p1, batch norm on this batch's mean / biased variance, ReLU], linear."""
    h = x
    for i in range(4):
        p = f"blocks.{i}.conv."
        if p + "weight" in w:
            kernel = w[p + "weight"]
        else:
            base = w[p + "base_layer.weight"]
            kernel = base + scaling * (w[p + "lora_B"] @ w[p + "lora_A"].reshape(w[p + "lora_A"].shape[0], -1)
                                       ).reshape(base.shape)
        h = F.conv2d(h, kernel, stride=2, padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5)
        h = torch.relu(h * w[f"blocks.{i}.norm.weight"].view(1, -1, 1, 1) + w[f"blocks.{i}.norm.bias"].view(1, -1, 1, 1))
    return h.flatten(1) @ w["head.weight"].T + w["head.bias"]


def reference_meta_grads(model: Conv4, adapted, batch: EpisodeBatch, steps: int, lrs=None):
    """d(mean query loss after `steps` second-order SGD steps on the adapted weights)/d(weights, lrs), task by task."""
    names = [k for k, _ in model.named_parameters()]
    weights = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    rates = {k: (lrs[k].detach().clone().requires_grad_() if lrs else torch.tensor(FAST_LR, dtype=torch.float64))
             for k in adapted}
    scaling = model.cfg.lora_alpha / model.cfg.lora_rank if model.cfg.lora_rank else 0.0
    losses = []
    for x_spt, y_spt, x_qry, y_qry in zip(*batch):
        fast = dict(weights)
        for _ in range(steps):
            loss = F.cross_entropy(reference_forward(fast, x_spt, scaling), y_spt)
            grads = torch.autograd.grad(loss, [fast[k] for k in adapted], create_graph=True)
            fast.update({k: fast[k] - rates[k] * g for k, g in zip(adapted, grads)})
        losses.append(F.cross_entropy(reference_forward(fast, x_qry, scaling), y_qry))
    meta_loss = torch.stack(losses).mean()
    wrt = [weights[k] for k in names] + ([rates[k] for k in adapted] if lrs else [])
    return meta_loss.item(), torch.autograd.grad(meta_loss, wrt)


def learner_for(model: Conv4, mode: str, algorithm: str = "maml", steps: int = 1, **cfg) -> MetaLearner:
    config = MetaLearnerConfig(algorithm=algorithm, inner_steps=steps, fast_lr=FAST_LR, **cfg)
    return MetaLearner(model, config, F.cross_entropy, adapted=adapted_names(model, mode))


# --- the network ---

def test_output_shapes_one_task_and_task_batched():
    model = make_model()
    assert model(torch.rand(7, 1, 28, 28, dtype=torch.float64)).shape == (7, N_WAY)
    assert model(torch.rand(3, 7, 1, 28, 28, dtype=torch.float64)).shape == (3, 7, N_WAY)
    assert model.head.in_features == 64 * 2 * 2


def test_batch_norm_uses_the_current_batch_statistics():
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64) * 4 + 7
    y = batch_norm(x, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 1e-5)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    model, images = make_model(), torch.rand(4, 1, 28, 28, dtype=torch.float64)
    changed = images.clone()
    changed[1:] = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    assert not torch.allclose(model(images)[0], model(changed)[0])  # image 0's logits depend on its batch
    torch.testing.assert_close(model.eval()(images), model.train()(images), rtol=0, atol=0)  # no running stats
    assert not any("running" in k for k in model.state_dict())


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_task_batched_forward_equals_each_task_alone(lora_rank):
    model = make_model(lora_rank)
    x = torch.rand(3, 6, 1, 28, 28, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    per_task = {k: p.detach() + 0.1 * torch.randn(3, *p.shape, generator=g, dtype=p.dtype)
                for k, p in model.named_parameters() if k.startswith(("head.", "blocks.1."))}
    shared = {k: p.detach() for k, p in model.named_parameters() if k not in per_task}
    got = torch.func.functional_call(model, {**shared, **per_task}, (x,))
    for t in range(3):
        want = torch.func.functional_call(model, {**shared, **{k: v[t] for k, v in per_task.items()}}, (x[t],))
        torch.testing.assert_close(got[t], want, rtol=1e-12, atol=1e-12)


class _ConvLayouts(TorchDispatchMode):
    """Records whether each convolution's output is channels-last (and not also plain-contiguous)."""

    def __init__(self):
        super().__init__()
        self.channels_last = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.convolution:
            self.channels_last.append(out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous())
        return out


@pytest.mark.parametrize("n_tasks", [1, 2])
def test_task_batched_convolutions_run_channels_last_also_for_one_grayscale_task(n_tasks):
    # one task of 1-channel images: (B, 1, H, W).contiguous(channels_last) keeps plain strides, and oneDNN would
    # then run every layer channels-first (1.2x slower meta-steps with one task per query graph)
    layouts = _ConvLayouts()
    with layouts:
        make_model()(torch.rand(n_tasks, 6, 1, 28, 28, dtype=torch.float64))
    assert layouts.channels_last == [True] * 4


def test_grouped_conv_and_batch_norm_functions_are_exact_to_second_order():
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: _GroupedConv.apply(a, b, 2), (x, w))
    gamma = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b, c: _BatchNorm.apply(a, b, c, 1e-5), (x, gamma, beta))


# --- LoRA ---

def test_lora_with_b_zero_leaves_the_output_unchanged_and_a_without_gradient():
    model = make_model(lora_rank=2)
    with torch.no_grad():
        for i in range(4):
            model.blocks[i].conv.lora_B.zero_()
    plain = {k.replace("conv.base_layer.", "conv."): p for k, p in model.named_parameters() if "lora_" not in k}
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference_forward(plain, x), rtol=1e-12, atol=1e-12)
    F.cross_entropy(model(x), torch.arange(5)).backward()
    assert all(model.blocks[i].conv.lora_A.grad.abs().max() == 0 for i in range(4))  # peft's start: dL/dA = 0


def test_lora_default_start_gives_both_factors_an_inner_gradient():
    torch.manual_seed(0)
    model = Conv4(Conv4Config(lora_rank=4))  # the default lora_b_std, float32 as trained
    assert all(model.blocks[i].conv.lora_B.abs().max() > 0 for i in range(4))
    F.cross_entropy(model(torch.rand(5, 1, 28, 28)), torch.arange(5)).backward()
    for i in range(4):
        conv = model.blocks[i].conv
        assert conv.lora_A.grad.abs().max() > 0 and conv.lora_B.grad.abs().max() > 0, i


# --- adapted sets ---

def test_adapted_names_per_mode_and_counts():
    full, lora = make_model(), make_model(lora_rank=4)
    assert adapted_names(full, "full") == tuple(k for k, _ in full.named_parameters())
    assert adapted_names(full, "head") == ("head.weight", "head.bias")
    assert adapted_names(lora, "lora") == (*(f"blocks.{i}.conv.lora_{m}" for i in range(4) for m in "AB"),
                                          "head.weight", "head.bias")
    n_full = 64 * 9 + 3 * 64 * 64 * 9 + 4 * 2 * 64 + 256 * N_WAY + N_WAY
    n_head = 256 * N_WAY + N_WAY
    n_lora = 4 * (9 + 64) + 3 * 4 * (64 * 9 + 64) + n_head  # A (r, C_in, 3, 3) and B (64, r) per conv
    assert sum(p.numel() for p in full.parameters()) == n_full == 112_965
    for model, mode, n in ((full, "full", n_full), (full, "head", n_head), (lora, "lora", n_lora)):
        assert learner_for(model, mode).n_adapted == n, mode
    with pytest.raises(ValueError, match="lora_rank"):
        adapted_names(full, "lora")
    with pytest.raises(ValueError, match="mode"):
        adapted_names(full, "bias")


# --- every MAML path against the reference ---

PATHS = {
    "task_batched": dict(task_batched=True),
    "task_batched_chunked": dict(task_batched=True, task_chunk=2, query_chunk=1),
    "task_batched_one_task": dict(task_batched=True, task_chunk=1),  # one grayscale task: the 1-channel layout
    "vmap": dict(vectorize=True),
    "loop": dict(vectorize=False),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode, steps", [("full", 1), ("full", 2), ("head", 2), ("lora", 1)])
def test_maml_meta_gradient_matches_per_task_reference(episodes, path, mode, steps):
    model = make_model(lora_rank=2 if mode == "lora" else 0)
    learner = learner_for(model, mode, steps=steps, **PATHS[path])
    loss, expected = reference_meta_grads(model, adapted_names(model, mode), episodes, steps)
    assert learner.meta_backward(episodes) == pytest.approx(loss, rel=1e-10)
    for name, got, want in zip(learner.params, (p.grad for p in learner.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("path", ["task_batched_chunked", "vmap"])
def test_metasgd_rate_gradients_match_reference(episodes, path):
    model = make_model()
    learner = learner_for(model, "full", algorithm="metasgd", steps=1, **PATHS[path])
    with torch.no_grad():
        for v in learner.lrs.values():
            v.mul_(0.5 + torch.rand(v.shape, generator=torch.Generator().manual_seed(3), dtype=v.dtype))
    _, expected = reference_meta_grads(model, adapted_names(model, "full"), episodes, 1, lrs=learner.lrs)
    learner.meta_backward(episodes)
    for got, want in zip((p.grad for p in learner.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
def test_first_order_algorithms_agree_across_paths(episodes, algorithm):
    grads = {}
    for path, cfg in PATHS.items():
        learner = learner_for(make_model(), "full", algorithm=algorithm, steps=2, **cfg)
        learner.meta_backward(episodes)
        grads[path] = [p.grad for p in learner.parameters()]
    for path in PATHS:
        for got, want in zip(grads[path], grads["loop"]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=path)


def test_task_batched_adapt_batch_and_evaluate_fast_match_the_loop(episodes):
    looped = learner_for(make_model(), "head", vectorize=False)
    batched = learner_for(make_model(), "head", task_batched=True, task_chunk=2)
    fast_l = looped.adapt_batch(episodes.x_spt, episodes.y_spt, 3)
    fast_b = batched.adapt_batch(episodes.x_spt, episodes.y_spt, 3)
    for k in fast_l:
        torch.testing.assert_close(fast_b[k], fast_l[k], rtol=1e-10, atol=1e-12, msg=k)
    torch.testing.assert_close(batched.evaluate_fast(fast_b, episodes.x_qry, episodes.y_qry),
                               looped.evaluate_fast(fast_l, episodes.x_qry, episodes.y_qry), rtol=1e-10, atol=1e-12)
