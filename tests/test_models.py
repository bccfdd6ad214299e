"""Heads, Weibull pooling and losses on timm's tiny test models; short trainings on synthetic cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from ensemble.labels import NUM_CLASSES
from ensemble.models import (
    CLA,
    CLH,
    DSA,
    DSALoss,
    DualStreamOutput,
    FocalLoss,
    PowerNorm,
    WeibullActivation,
    WeibullPool,
    WeightedBCELoss,
    class_weights,
    create_model,
    init_class_prior,
)
from ensemble.models.losses import focal_loss, weighted_bce

SIZE = 32

# ---------------------------------------------------------------- synthetic cells

# Four patterns of the green (protein) channel, standing for four localisation classes.
PATTERN_CLASSES = (0, 13, 9, 17)  # nucleoplasm: central blob, plasma membrane: ring, actin: stripes, vesicles: dots


def make_cells(labels: np.ndarray, seed: int, size: int = SIZE) -> torch.Tensor:
    """Synthetic 4-channel cells (n, 4, size, size) showing the green patterns marked in ``labels`` (n, 4).

    Red and yellow fill a disc (the cell body), blue a smaller one (the nucleus); sizes,
    positions, stripe angles, dot positions and intensities vary, plus Gaussian noise.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cells = np.zeros((len(labels), 4, size, size), np.float32)
    for cell, shows in zip(cells, labels):
        cy, cx = size / 2 + rng.uniform(-2, 2, 2)
        r = np.hypot(yy - cy, xx - cx)
        radius = size * rng.uniform(0.33, 0.40)
        body = (r < radius).astype(np.float32)
        green = np.zeros((size, size), np.float32)
        if shows[0]:
            green += np.exp(-((r / (0.3 * radius)) ** 2))
        if shows[1]:
            green += np.exp(-((r - 0.9 * radius) ** 2))
        if shows[2]:
            angle = rng.uniform(0, np.pi)
            green += body * (0.5 + 0.5 * np.sin(np.pi / 2 * (np.cos(angle) * xx + np.sin(angle) * yy)))
        if shows[3]:
            for angle, distance in zip(rng.uniform(0, 2 * np.pi, 6), rng.uniform(0.5, 0.85, 6) * radius):
                dot_y, dot_x = cy + distance * np.sin(angle), cx + distance * np.cos(angle)
                green += np.exp(-((yy - dot_y) ** 2 + (xx - dot_x) ** 2) / 2)
        cell[0] = body * rng.uniform(0.4, 0.8)
        cell[1] = green * rng.uniform(0.6, 1.0)
        cell[2] = (r < 0.45 * radius) * rng.uniform(0.5, 1.0)
        cell[3] = body * rng.uniform(0.3, 0.6)
    cells += rng.normal(0, 0.05, cells.shape).astype(np.float32)
    return torch.from_numpy(cells)


def to_19(labels: np.ndarray) -> torch.Tensor:
    """Labels over the four pattern classes (..., 4) -> multi-hot over all 19 classes."""
    full = torch.zeros(labels.shape[:-1] + (NUM_CLASSES,))
    full[..., list(PATTERN_CLASSES)] = torch.from_numpy(labels).float()
    return full


def cell_labels(n: int, seed: int) -> np.ndarray:
    """One pattern per cell, a second one for 30% of cells."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 4), np.float32)
    labels[np.arange(n), rng.integers(0, 4, n)] = 1
    second = rng.random(n) < 0.3
    labels[second, rng.integers(0, 4, second.sum())] = 1
    return labels


def bag_labels(n_images: int, cells_per_image: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HPA-like weak labelling: each image has one pattern, shown by ~60% of its cells.

    Returns image labels (n_images, 4) and true cell labels (n_images, cells_per_image, 4).
    """
    rng = np.random.default_rng(seed)
    images = np.zeros((n_images, 4), np.float32)
    images[np.arange(n_images), rng.integers(0, 4, n_images)] = 1
    shown = rng.random((n_images, cells_per_image, 1)) < 0.6
    return images, (images[:, None, :] * shown).astype(np.float32)


def macro_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(average_precision_score(labels, scores, average="macro"))


def train(model, batches, loss_fn, steps: int, lr: float = 3e-3) -> list[float]:
    """Adam for ``steps`` steps; ``batches(step)`` gives the inputs and targets, ``loss_fn(output, *targets)``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        inputs, *targets = batches(step)
        loss = loss_fn(model(inputs), *targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test here on one torch thread.

    Tiny models gain nothing from a second thread, and on a busy machine each of their many small
    ops waits for it to be scheduled: the training tests ran ~100x slower with two threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- shapes and the factory


@pytest.fixture(scope="module")
def cells():
    return torch.rand(2, 4, SIZE, SIZE)


@pytest.mark.parametrize("head, head_class", [("cla", CLA), ("clh", CLH)])
def test_cell_heads_shapes(head, head_class, cells):
    model = create_model(head, "test_efficientnet", img_size=SIZE).eval()
    assert isinstance(model, head_class)
    with torch.no_grad():
        features = model.forward_features(cells)
        assert features.shape[:2] == (2, model.num_features)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        assert model(cells).shape == (2, NUM_CLASSES)


def test_dsa_shapes():
    model = create_model("dsa", "test_nfnet", num_classes=7).eval()
    assert isinstance(model, DSA)
    bags = torch.rand(2, 3, 4, SIZE, SIZE)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        features = model.forward_features(bags, valid)
        output = model.forward_head(features, valid)
    assert features.shape[:3] == (2, 3, model.num_features)
    assert not features[~valid].any()  # padded cells are never computed
    assert isinstance(output, DualStreamOutput)
    assert output.image_logits.shape == (2, 7)
    assert output.cell_logits.shape == (2, 3, 7)
    assert model.forward_head(features, valid, pre_logits=True).shape == (2, 3, model.num_features)


def test_clh_checkpoint_round_trip_without_fixed_filters(cells):
    model = create_model("clh", "test_efficientnet", img_size=SIZE).eval()
    state = model.state_dict()
    assert not any("scattering" in key for key in state)  # rebuilt from (J, L, size), not stored
    copy = create_model("clh", "test_efficientnet", img_size=SIZE).eval()
    copy.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(copy(cells), model(cells))


@pytest.mark.parametrize("backbone", ["test_resnet", "test_convnext", "test_byobnet", "test_vit"])
def test_any_timm_backbone(backbone, cells):
    model = create_model("cla", backbone, img_size=SIZE, pool="weibull", per_channel=True).eval()
    with torch.no_grad():
        assert model(cells).shape == (2, NUM_CLASSES)


def test_factory_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown head"):
        create_model("mil", "test_efficientnet")
    with pytest.raises(ValueError, match="EfficientNet"):
        create_model("clh", "test_resnet", img_size=SIZE)
    with pytest.raises(ValueError, match="img_size"):
        create_model("clh", "test_efficientnet")


@pytest.mark.parametrize("head", ["cla", "dsa"])
def test_classifiers_start_at_the_class_prior(head, cells):
    rates = np.linspace(0.005, 0.6, NUM_CLASSES)
    model = create_model(head, "test_efficientnet", img_size=SIZE)
    init_class_prior(model, rates)
    with torch.no_grad():
        out = model.eval()(cells.unsqueeze(0) if head == "dsa" else cells)
    for logits in out if head == "dsa" else (out,):
        probabilities = torch.sigmoid(logits).reshape(-1, NUM_CLASSES).numpy()
        np.testing.assert_allclose(probabilities, np.broadcast_to(rates, probabilities.shape), atol=0.02)
    with pytest.raises(ValueError, match="shape"):
        init_class_prior(model, rates[:5])


# ---------------------------------------------------------------- DSA padding


@pytest.mark.parametrize("training", [False, True])
def test_dsa_padded_cells_change_nothing(training):
    """Garbage in padded slots changes neither the image logits nor the real cells' logits.

    In training mode too: padded cells never reach the backbone, so BatchNorm statistics match.
    """
    torch.manual_seed(0)
    model = create_model("dsa", "test_efficientnet").train(training)
    real = torch.rand(2, 3, 4, SIZE, SIZE)
    padded = torch.randn(2, 5, 4, SIZE, SIZE) * 100  # garbage everywhere, real cells in slots 0, 2, 3
    padded[:, [0, 2, 3]] = real
    valid = torch.zeros(2, 5, dtype=torch.bool)
    valid[:, [0, 2, 3]] = True
    with torch.no_grad():
        plain = model(real)
        masked = model(padded, valid)
    torch.testing.assert_close(masked.image_logits, plain.image_logits)
    torch.testing.assert_close(masked.cell_logits[:, [0, 2, 3]], plain.cell_logits)


def test_dsa_bag_without_cells_stays_finite():
    model = create_model("dsa", "test_efficientnet").eval()
    with torch.no_grad():
        output = model(torch.rand(1, 2, 4, SIZE, SIZE), torch.zeros(1, 2, dtype=torch.bool))
    assert torch.isfinite(output.image_logits).all()


# ---------------------------------------------------------------- Weibull pooling


def test_weibull_follows_equations():
    """T = (R/lambda)^(zeta-1) exp(-(R/gamma)^eta); pool = alpha * mean(T)^beta."""
    torch.manual_seed(0)
    pool = WeibullPool(num_channels=3)
    with torch.no_grad():
        for parameter in pool.parameters():
            parameter.uniform_(-1, 1)
    r = torch.rand(2, 3, 4, 4) * 5 + 0.01
    weibull = pool.activation
    lam, zeta, gamma, eta = (p.view(-1, 1, 1) for p in (weibull.lambda_, weibull.zeta, weibull.gamma, weibull.eta))
    expected_t = (r / lam) ** (zeta - 1) * torch.exp(-((r / gamma) ** eta))
    torch.testing.assert_close(weibull(r), expected_t)
    expected = pool.norm.alpha * expected_t.mean(dim=(-2, -1)) ** pool.norm.beta
    torch.testing.assert_close(pool(r), expected)


def test_weibull_parameters_stay_in_range():
    pool = WeibullPool()
    with torch.no_grad():
        for parameter in pool.parameters():
            parameter.fill_(-50.0)  # as far into the invalid side as training could push them
    weibull, norm = pool.activation, pool.norm
    assert (weibull.lambda_ > 0).all() and (weibull.gamma > 0).all() and (weibull.eta > 0).all()
    assert (weibull.zeta > 1).all() and (norm.alpha > 0).all()
    assert (norm.beta > 0).all() and (norm.beta <= 1).all()


@pytest.mark.parametrize("per_channel", [False, True])
def test_gradients_reach_every_weibull_parameter(per_channel):
    torch.manual_seed(0)
    model = create_model("cla", "test_efficientnet", per_channel=per_channel)
    loss = model(torch.rand(4, 4, SIZE, SIZE)).square().mean()
    loss.backward()
    raw = dict(model.pool.named_parameters())
    assert len(raw) == 6
    for name, parameter in raw.items():
        assert parameter.shape == ((model.num_features,) if per_channel else (1,))
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


_MAGNITUDES = torch.logspace(-8, 4, 144).view(2, 8, 3, 3)  # 1e-8 .. 1e4
EXTREME_INPUTS = {
    "negative": -_MAGNITUDES,
    "zero": torch.zeros(2, 8, 3, 3),
    "large": torch.full((2, 8, 3, 3), 1e4),
    "mixed": _MAGNITUDES * torch.tensor([1.0, -1.0, 0.0]).repeat(48).view(2, 8, 3, 3),
}


def _extreme_parameters(pool: WeibullPool) -> WeibullPool:
    """Push every parameter to a corner: tiny lambda and gamma, steep zeta and eta, large alpha."""
    with torch.no_grad():
        pool.activation.raw_lambda.fill_(-10.0)
        pool.activation.raw_zeta.fill_(30.0)
        pool.activation.raw_gamma.fill_(-10.0)
        pool.activation.raw_eta.fill_(20.0)
        pool.norm.raw_alpha.fill_(10.0)
    return pool


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["float32", "bf16", "fp16"])
@pytest.mark.parametrize("extreme", [False, True], ids=["default", "extreme-parameters"])
@pytest.mark.parametrize("kind", list(EXTREME_INPUTS))
def test_weibull_pool_is_numerically_safe(kind, extreme, autocast):
    pool = _extreme_parameters(WeibullPool(8)) if extreme else WeibullPool(8)
    x = EXTREME_INPUTS[kind].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        inputs = x.to(autocast) if autocast else x
        out = pool(inputs)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, parameter in pool.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name


def test_cla_trains_under_bf16_autocast(cells):
    model = create_model("cla", "test_efficientnet")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(cells * 1e3)
    logits.float().sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_power_norm_at_zero_has_finite_gradient():
    s = torch.zeros(3, 5, requires_grad=True)
    PowerNorm()(s).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_weibull_activation_per_channel_parameters_broadcast():
    activation = WeibullActivation(num_channels=4, gamma=2.0)
    assert activation(torch.rand(2, 4, 5, 5)).shape == (2, 4, 5, 5)


# ---------------------------------------------------------------- losses


@pytest.fixture(scope="module")
def logits_targets():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, NUM_CLASSES, generator=generator) * 3
    targets = (torch.rand(6, NUM_CLASSES, generator=generator) > 0.7).float()
    return logits, targets


def test_weighted_bce_equals_torch_bce_with_unit_weights(logits_targets):
    logits, targets = logits_targets
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    torch.testing.assert_close(weighted_bce(logits, targets), expected)
    ones = torch.ones(NUM_CLASSES)
    all_rows = torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(WeightedBCELoss(ones)(logits, targets, torch.ones(6), all_rows), expected)


def test_focal_reduces_to_bce_at_gamma_zero(logits_targets):
    logits, targets = logits_targets
    torch.testing.assert_close(focal_loss(logits, targets, gamma=0.0), weighted_bce(logits, targets))
    assert FocalLoss(gamma=2.0)(logits, targets) < weighted_bce(logits, targets)


def test_focal_matches_the_classic_form_on_hard_targets(logits_targets):
    logits, targets = logits_targets
    p = torch.sigmoid(logits)
    p_t = torch.where(targets > 0, p, 1 - p)
    alpha_t = torch.where(targets > 0, 0.25, 0.75)
    classic = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    torch.testing.assert_close(focal_loss(logits, targets, gamma=2.0, alpha=0.25), classic)


def test_losses_accept_soft_targets(logits_targets):
    logits, _ = logits_targets
    soft = torch.sigmoid(logits)  # a prediction that matches its target exactly
    torch.testing.assert_close(weighted_bce(logits, soft), F.binary_cross_entropy_with_logits(logits, soft))
    assert focal_loss(logits, soft, gamma=2.0) < 1e-6


def test_mask_and_sample_weights(logits_targets):
    logits, targets = logits_targets
    mask = torch.tensor([True, False, True, True, False, True])
    on_subset = weighted_bce(logits[mask], targets[mask])
    torch.testing.assert_close(weighted_bce(logits, targets, mask=mask), on_subset)
    torch.testing.assert_close(weighted_bce(logits, targets, sample_weights=mask.float()), on_subset)
    uniform = weighted_bce(logits, targets, sample_weights=torch.full((6,), 3.0))
    torch.testing.assert_close(uniform, weighted_bce(logits, targets))
    assert weighted_bce(logits, targets, mask=torch.zeros(6, dtype=torch.bool)) == 0


def test_class_weights_favour_rare_classes():
    weights = class_weights([0.5, 0.1, 0.01, 0.0])
    assert weights.dtype == torch.float32
    assert torch.isclose(weights.mean(), torch.tensor(1.0))
    assert (weights.diff() > 0).all()
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(class_weights([0.5, 0.1], power=0.0), torch.ones(2))


def test_dsa_loss_weights_streams_and_ignores_padded_cells():
    generator = torch.Generator().manual_seed(0)
    image_targets = (torch.rand(2, NUM_CLASSES, generator=generator) > 0.5).float()
    cell_targets = image_targets[:, None].expand(2, 3, NUM_CLASSES)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    output = DualStreamOutput(
        torch.randn(2, NUM_CLASSES, generator=generator), torch.randn(2, 3, NUM_CLASSES, generator=generator)
    )
    loss = DSALoss()(output, image_targets, cell_targets, valid)
    expected = weighted_bce(output.image_logits, image_targets) + 0.2 * weighted_bce(
        output.cell_logits[valid], cell_targets[valid]
    )
    torch.testing.assert_close(loss, expected)
    garbage = output.cell_logits.clone()
    garbage[~valid] = 1e4
    with_garbage = DSALoss()(output._replace(cell_logits=garbage), image_targets, cell_targets, valid)
    torch.testing.assert_close(with_garbage, loss)


# ---------------------------------------------------------------- training on synthetic cells

MAP_MARGIN = 0.3  # required cell mAP gain over the class-prior predictor on held-out cells


def test_cla_learns_synthetic_cells():
    train_labels, test_labels = cell_labels(512, seed=1), cell_labels(256, seed=2)
    train_cells, test_cells = make_cells(train_labels, seed=3), make_cells(test_labels, seed=4)
    targets = to_19(train_labels)
    torch.manual_seed(0)
    model = create_model("cla", "test_efficientnet")
    order = np.random.default_rng(0).integers(0, len(train_cells), (200, 16))
    losses = train(model, lambda step: (train_cells[order[step]], targets[order[step]]), WeightedBCELoss(), steps=200)
    with torch.no_grad():
        scores = torch.sigmoid(model(test_cells))[:, list(PATTERN_CLASSES)].numpy()
    prior = macro_ap(test_labels, np.tile(train_labels.mean(0), (len(test_labels), 1)))
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert macro_ap(test_labels, scores) > prior + MAP_MARGIN


def test_dsa_learns_cells_from_weak_image_labels():
    """Cells inherit their image's label (weak), yet the cell stream learns which cells show it."""
    n_cells = 4
    train_images, train_truth = bag_labels(160, n_cells, seed=1)
    test_images, test_truth = bag_labels(48, n_cells, seed=2)
    train_bags = make_cells(train_truth.reshape(-1, 4), seed=3).unflatten(0, (-1, n_cells))
    test_bags = make_cells(test_truth.reshape(-1, 4), seed=4).unflatten(0, (-1, n_cells))
    image_targets = to_19(train_images)
    weak_cell_targets = image_targets[:, None].expand(-1, n_cells, -1)
    torch.manual_seed(0)
    model = create_model("dsa", "test_efficientnet")
    order = np.random.default_rng(0).integers(0, len(train_bags), (200, 4))

    def batches(step):
        bags = order[step]
        return train_bags[bags], image_targets[bags], weak_cell_targets[bags]

    losses = train(model, batches, DSALoss(), steps=200)
    with torch.no_grad():
        output = model(test_bags)
    columns = list(PATTERN_CLASSES)
    cell_scores = torch.sigmoid(output.cell_logits)[..., columns].flatten(0, 1).numpy()
    image_scores = torch.sigmoid(output.image_logits)[:, columns].numpy()
    truth = test_truth.reshape(-1, 4)
    prior = macro_ap(truth, np.tile(train_truth.reshape(-1, 4).mean(0), (len(truth), 1)))
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert macro_ap(truth, cell_scores) > prior + MAP_MARGIN
    assert macro_ap(test_images, image_scores) > macro_ap(test_images, np.full_like(image_scores, 0.25)) + MAP_MARGIN


def test_clh_loss_drops_and_fusion_blocks_learn():
    train_labels = cell_labels(128, seed=1)
    train_cells, targets = make_cells(train_labels, seed=3), to_19(train_labels)
    torch.manual_seed(0)
    model = create_model("clh", "test_efficientnet", img_size=SIZE)
    order = np.random.default_rng(0).integers(0, len(train_cells), (25, 16))
    losses = train(model, lambda step: (train_cells[order[step]], targets[order[step]]), WeightedBCELoss(), steps=25)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    for fusion in model.backbone.fusions.values():  # zero-initialised: any change means scattering flows in
        assert fusion.norm.weight.abs().sum() > 0



@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16])
def test_cell_input_scales_crops_by_their_dtype_and_refuses_floats(dtype):
    from ensemble.models import cell_input

    top = torch.iinfo(dtype).max
    crops = torch.tensor([0, top // 2, top], dtype=dtype).reshape(1, 1, 1, 3).expand(2, 4, 3, 3).contiguous()
    x = cell_input(crops)
    assert x.dtype == torch.float32 and x.shape == crops.shape
    torch.testing.assert_close(x[0, 0, 0], torch.tensor([0.0, (top // 2) / top, 1.0]))
    assert cell_input(crops, cell_size=6).shape == (2, 4, 6, 6)
    with pytest.raises(TypeError, match="integers"):
        cell_input(x)
