"""TaskNorm-I against batch norm, instance norm and a hand computation; MAML with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.anil import ANIL
from metarun.algorithms.inner_loop import query_forward
from metarun.algorithms.maml import MAML
from metarun.algorithms.maml_plus_plus import MAMLPlusPlus
from metarun.algorithms.meta_sgd import MetaSGD
from metarun.algorithms.reptile import Reptile
from metarun.build import build
from metarun.episodes import TEST, Episode, collate_episodes
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from metarun.models.norm import TaskNorm2d, batch_norm


def layer(alpha_logit: float) -> TaskNorm2d:
    """A float64 TaskNorm-I layer with α = sigmoid(alpha_logit) (scale 0) and an affine map."""
    norm = TaskNorm2d(3).double()
    with torch.no_grad():
        norm.offset.fill_(alpha_logit)
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    return norm


def inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 3, 4, 5, generator=g, dtype=torch.float64) * 2 + 1  # [M, C, H, W]


def test_alpha_one_is_batch_norm_with_the_context_moments():
    x, n = inputs(), 4
    out = layer(60.0)(x, context_size=n)  # sigmoid(60) = 1 in float64 up to 1e-26
    mean = x[:n].mean((0, 2, 3), keepdim=True)
    var = x[:n].var((0, 2, 3), unbiased=False, keepdim=True)
    w, b = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([0.0, -1.0, 3.0], dtype=torch.float64)
    expected = F.batch_norm(x, mean.flatten(), var.flatten(), w, b, training=False, eps=1e-5)
    torch.testing.assert_close(out, expected)
    # the context rows alone: ordinary (transductive) batch norm of the support set
    torch.testing.assert_close(out[:n], F.batch_norm(x[:n], None, None, w, b, training=True, eps=1e-5))


def test_alpha_zero_is_instance_norm():
    x = inputs()
    out = layer(-60.0)(x, context_size=3)
    w, b = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([0.0, -1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(out, F.instance_norm(x, weight=w, bias=b, eps=1e-5))


def test_intermediate_alpha_matches_a_hand_computation():
    x, n = inputs(), 4
    norm = layer(0.0)
    with torch.no_grad():
        norm.scale.fill_(0.1)
        norm.offset.fill_(-0.3)
    out = norm(x, context_size=n)
    a = 1 / (1 + torch.exp(torch.tensor(-(0.1 * n - 0.3), dtype=torch.float64)))
    for i in range(x.shape[0]):
        for c in range(3):
            ctx, own = x[:n, c].flatten(), x[i, c].flatten()
            mu_bn, mu_in = ctx.sum() / ctx.numel(), own.sum() / own.numel()
            var_bn = ((ctx - mu_bn) ** 2).sum() / ctx.numel()
            var_in = ((own - mu_in) ** 2).sum() / own.numel()
            mu = a * mu_bn + (1 - a) * mu_in
            var = a * (var_bn + (mu_bn - mu) ** 2) + (1 - a) * (var_in + (mu_in - mu) ** 2)
            expected = norm.weight[c] * (x[i, c] - mu) / (var + 1e-5).sqrt() + norm.bias[c]
            torch.testing.assert_close(out[i, c], expected.detach())
    # a query row only sees the context and itself: changing another query leaves it unchanged
    y = x.clone()
    y[n + 1] += 5.0
    torch.testing.assert_close(norm(y, context_size=n)[n], out[n])


def test_support_norm_is_batch_norm_with_the_support_moments():
    """model.norm=support: every row, support or query, is batch-normalised with the first n
    rows' moments, and a query row depends on nothing but the support set and itself."""
    x, n = inputs(), 4
    norm = batch_norm(3, "support").double()
    assert isinstance(norm, TaskNorm2d) and not hasattr(norm, "scale")
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    out = norm(x, context_size=n)
    mean = x[:n].mean((0, 2, 3))
    var = x[:n].var((0, 2, 3), unbiased=False)
    expected = F.batch_norm(x, mean, var, norm.weight, norm.bias, training=False, eps=norm.eps)
    torch.testing.assert_close(out, expected.detach())
    y = x.clone()
    y[n + 1] += 5.0
    torch.testing.assert_close(norm(y, context_size=n)[n], out[n])
    assert Conv4(hidden=8, norm="support").uses_context


def test_gradients_reach_scale_and_offset():
    x, n = inputs(), 4
    norm = layer(0.2)
    with torch.no_grad():
        norm.scale.fill_(-0.1)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = lambda: (norm(x, context_size=n) * target).sum()  # noqa: E731
    loss().backward()
    for p in (norm.scale, norm.offset):
        assert p.grad is not None and p.grad.abs() > 1e-6
        h = 1e-6
        with torch.no_grad():
            p += h
            up = loss()
            p -= 2 * h
            down = loss()
            p += h
        assert p.grad.item() == pytest.approx(((up - down) / (2 * h)).item(), rel=1e-5)


def test_conv4_context_size_and_unknown_norm():
    torch.manual_seed(0)
    model = Conv4(hidden=8, out_features=5, norm="tasknorm")
    assert model.uses_context and not Conv4(hidden=8, norm="transductive").uses_context
    support, query = torch.randn(5, 1, 28, 28), torch.randn(6, 1, 28, 28)
    params = dict(model.named_parameters())
    together = query_forward(model, params, support, query)  # [6, 5]
    alone = torch.stack([query_forward(model, params, support, q[None])[0] for q in query])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)  # queries are independent
    with pytest.raises(ConfigError, match="model.norm"):
        batch_norm(8, "group")


def random_batch(seed: int, tasks: int = 2):
    """5-way 1-shot episodes of random 28×28 images, 2 queries per class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(5)
    return collate_episodes(
        [
            Episode(
                torch.randn(5, 1, 28, 28, generator=g),
                labels,
                torch.randn(10, 1, 28, 28, generator=g),
                labels.repeat(2),
            )
            for _ in range(tasks)
        ]
    )


def train_and_predict(algorithm, batches, blend: bool = True) -> None:
    """A few outer Adam steps (α must move, if learned), then a finite prediction."""
    names = [k for k, _ in algorithm.named_parameters() if k.startswith("model.") and k.endswith(("scale", "offset"))]
    assert len(names) == (8 if blend else 0)  # 4 TaskNorm layers × (scale, offset)
    before = {k: v.detach().clone() for k, v in algorithm.named_parameters() if k in names}
    opt = torch.optim.Adam(algorithm.parameters(), lr=1e-3)
    for batch in batches[:-1]:
        out = algorithm.meta_loss(batch)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = dict(algorithm.named_parameters())
    assert all(not torch.equal(before[k], after[k]) for k in names)  # α is learned
    pred = algorithm.predict(batches[-1])
    assert pred.query_logits.shape == (*batches[-1].query_y.shape, 5)
    assert torch.isfinite(pred.query_logits).all() and torch.isfinite(pred.query_logits_before).all()


GRADIENT_LEARNERS = {
    "maml": lambda m: MAML(m, inner_lr=0.4, inner_steps=1, test_inner_steps=2),
    "anil": lambda m: ANIL(m, inner_lr=0.4, inner_steps=1, test_inner_steps=2),
    "meta_sgd": lambda m: MetaSGD(m, init_inner_lr=0.4, inner_steps=1, test_inner_steps=2),
    "maml_plus_plus": lambda m: MAMLPlusPlus(m, inner_lr=0.4, inner_steps=2, test_inner_steps=2),
    "reptile": lambda m: Reptile(m, inner_lr=0.1, inner_steps=2, test_inner_steps=2),
}


@pytest.mark.parametrize("norm", ["tasknorm", "support"])
@pytest.mark.parametrize("name", sorted(GRADIENT_LEARNERS))
def test_gradient_learners_score_queries_against_the_support_context(name, norm):
    """Under TaskNorm (and the support-moments norm) every query is normalised with the
    support set's moments (plus its own, for TaskNorm), never with the other queries':
    changing one query image leaves the others' predictions, before and after adaptation,
    unchanged; TaskNorm's blend α is meta-learned."""
    torch.manual_seed(0)
    algorithm = GRADIENT_LEARNERS[name](Conv4(hidden=8, out_features=5, norm=norm))
    train_and_predict(algorithm, [random_batch(s) for s in range(3)], blend=norm == "tasknorm")
    batch = random_batch(7, tasks=1)
    changed = random_batch(7, tasks=1)
    changed.query_x[0, 3] += 3.0  # task 0, query 3
    a, b = algorithm.predict(batch), algorithm.predict(changed)
    keep = [i for i in range(batch.query_x.shape[1]) if i != 3]
    for before_or_after in ("query_logits", "query_logits_before"):
        x, y = getattr(a, before_or_after)[0, keep], getattr(b, before_or_after)[0, keep]
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a.query_logits[0, 3], b.query_logits[0, 3])


def test_maml_with_tasknorm_on_omniglot(omniglot_available, make_config):
    cfg = make_config(
        "dataset=omniglot",
        "algorithm=maml",
        "model.norm=tasknorm",
        "model.hidden=8",
        "algorithm.inner_steps=1",
        "algorithm.test_inner_steps=2",
    )
    objects = build(cfg)
    algorithm, sampler = objects["algorithm"], objects["sampler"]
    splits = objects["datamodule"].splits
    batches = [sampler.train_batch(splits["train"], step) for step in range(2)]
    batches.append(collate_episodes([sampler.eval_episode(splits["test"], TEST, i) for i in range(2)]))
    train_and_predict(algorithm, batches)
