import numpy as np
import pandas as pd
import pytest
import torch

from components.task_encoder import (EncoderTrainConfig, TaskEmbeddingNetwork, TaskEncoderConfig, fit_contrastive,
                                     fit_regression, info_nce)

N_WAY, K_SHOT, DIM = 3, 2, 6


def toy_episodes(n_groups: int = 4, per_group: int = 6, seed: int = 0):
    """Episodes (E, N*K, D) whose features sit around their group's centre; groups (E,) as strings."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(n_groups, DIM, generator=gen)
    groups = np.repeat(np.arange(n_groups), per_group)
    features = centres[groups][:, None, :] + torch.randn(len(groups), N_WAY * K_SHOT, DIM, generator=gen)
    labels = torch.arange(N_WAY).repeat(K_SHOT).expand(len(groups), -1)
    return features, labels, np.array([f"g{g}" for g in groups])


@pytest.mark.parametrize("label_input", ["class_mean", "onehot"])
def test_invariant_to_support_order(label_input):
    net = TaskEmbeddingNetwork(TaskEncoderConfig(DIM, N_WAY, label_input, hidden=16, embed_dim=4))
    features, labels, _ = toy_episodes()
    z = net(features, labels)
    assert z.shape == (len(labels), 4)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(len(labels)))
    perm = torch.randperm(N_WAY * K_SHOT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(net(features[:, perm], labels[:, perm]), z)
    torch.testing.assert_close(net(features[0], labels[0]), z[0])


def test_class_mean_input_blind_to_relabelling():
    net = TaskEmbeddingNetwork(TaskEncoderConfig(DIM, N_WAY, hidden=16, embed_dim=4))
    features, labels, _ = toy_episodes()
    torch.testing.assert_close(net(features, (labels + 1) % N_WAY), net(features, labels))


def test_seeded_initialisation():
    cfg = TaskEncoderConfig(DIM, N_WAY, hidden=16, embed_dim=4, seed=5)
    a, b = TaskEmbeddingNetwork(cfg).state_dict(), TaskEmbeddingNetwork(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_info_nce_by_hand():
    # Two pairs of orthogonal unit vectors, tau = 1: the partner has cos 1, the two others cos 0.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    expected = -np.log(np.e / (np.e + 2))
    assert info_nce(z, 1.0).item() == pytest.approx(expected)


def test_contrastive_training_lowers_loss_and_groups_cluster():
    features, labels, groups = toy_episodes()
    cfg = TaskEncoderConfig(DIM, N_WAY, hidden=32, embed_dim=8)
    train = EncoderTrainConfig(steps=150, lr=3e-3, batch_groups=4)
    state, losses = fit_contrastive(cfg, features, labels, groups, train)
    assert len(losses) == 150
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    net = TaskEmbeddingNetwork(cfg)
    net.load_state_dict(state)
    with torch.no_grad():
        z = net(features, labels)
    sim = (z @ z.T).numpy()
    same = groups[:, None] == groups[None, :]
    off = ~np.eye(len(groups), dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean() + 0.5
    state_again, losses_again = fit_contrastive(cfg, features, labels, groups, train)
    assert losses_again == losses


def test_regression_training_lowers_loss():
    features, labels, groups = toy_episodes()
    names = sorted(set(groups))
    position = {g: i for i, g in enumerate(names)}
    gains = pd.DataFrame([[-abs(position[s] - position[t]) / 3 for t in names] for s in names], index=names,
                         columns=names)
    gains.iloc[0, 1] = np.nan  # a missing measurement is skipped
    cfg = TaskEncoderConfig(DIM, N_WAY, hidden=32, embed_dim=8)
    _, losses = fit_regression(cfg, features, labels, groups, gains, EncoderTrainConfig(steps=150, lr=3e-3))
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])


def test_refuses_bad_groups():
    features, labels, groups = toy_episodes()
    cfg = TaskEncoderConfig(DIM, N_WAY)
    with pytest.raises(ValueError, match="groups"):
        fit_contrastive(cfg, features, labels, groups[:-1])
    with pytest.raises(ValueError, match="groups"):
        fit_contrastive(cfg, features, labels, np.arange(len(groups)))
    with pytest.raises(ValueError, match="label_input"):
        TaskEncoderConfig(DIM, label_input="names")
