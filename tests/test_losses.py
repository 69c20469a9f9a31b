"""Golden values: each loss term on fixed inputs against numbers computed by hand (see comments)."""

import pytest
import torch

from makd.config import LossTerm
from makd.errors import MakdError
from makd.losses import Batch, WeightedLoss, aspect_bce, cross_entropy
from makd.models import StudentOutput

OUT = StudentOutput(class_logits=torch.tensor([[2.0, 0.0, -1.0]]), aspect_logits=torch.tensor([[0.0, 2.0]]))
BATCH = Batch(labels=torch.tensor([0]), aspect_logodds=torch.tensor([[0.0, -2.0]]), aspect_mass=torch.tensor([[1.0, 0.25]]))


def test_ce_golden():
    # -log softmax([2, 0, -1])[0] = log(e^2 + 1 + e^-1) - 2
    assert cross_entropy(OUT, BATCH).item() == pytest.approx(0.16984601955628564, abs=1e-6)


def test_aspect_bce_golden():
    # targets sigmoid([0, -2]) = [0.5, 0.1192]; BCE(x, t) = softplus(x) - t x
    # mean(log 2, softplus(2) - 2 sigmoid(-2)) = 1.2908346737793415
    assert aspect_bce(OUT, BATCH).item() == pytest.approx(1.2908346737793415, abs=1e-6)


def test_aspect_bce_temperature_softens_targets():
    # T = 2: targets sigmoid([0, -1])
    assert aspect_bce(OUT, BATCH, temperature=2.0).item() == pytest.approx(1.141096174431464, abs=1e-6)


def test_aspect_bce_mass_weighting():
    # (1 * log 2 + 0.25 * (softplus(2) - 2 sigmoid(-2))) / (1 + 0.25)
    assert aspect_bce(OUT, BATCH, mass_weighting=True).item() == pytest.approx(0.9322221778477037, abs=1e-6)


def test_aspect_bce_matches_torch_formula_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    logits, logodds = torch.randn(8, 5, generator=g), 3 * torch.randn(8, 5, generator=g)
    out = StudentOutput(torch.zeros(8, 3), logits)
    batch = Batch(torch.zeros(8, dtype=torch.long), logodds, torch.ones(8, 5))
    expected = torch.nn.BCEWithLogitsLoss()(logits, torch.sigmoid(logodds))
    assert aspect_bce(out, batch).item() == pytest.approx(expected.item(), abs=1e-6)


def test_weighted_sum_logs_each_weighted_term():
    loss = WeightedLoss({"ce": LossTerm(weight=1.0), "aspect_bce": LossTerm(weight=4.0)})
    total, parts = loss(OUT, BATCH)
    assert parts["aspect_bce"].item() == pytest.approx(4 * 1.2908346737793415, abs=1e-5)
    assert total.item() == pytest.approx(0.16984601955628564 + 4 * 1.2908346737793415, abs=1e-5)
    assert loss.needs_aspects


def test_zero_weight_terms_are_dropped_and_options_checked():
    loss = WeightedLoss({"ce": LossTerm(weight=1.0), "aspect_bce": LossTerm(weight=0.0)})
    assert not loss.needs_aspects and [name for name, *_ in loss.terms] == ["ce"]
    with pytest.raises(MakdError, match="loss.aspect_bce: unknown option 'temprature'"):
        WeightedLoss({"aspect_bce": LossTerm(weight=1.0, temprature=2.0)})
    with pytest.raises(MakdError, match="loss.focal: unknown loss term"):
        WeightedLoss({"focal": LossTerm(weight=1.0)})
    with pytest.raises(MakdError, match="every term has weight 0"):
        WeightedLoss({"ce": LossTerm(weight=0.0)})
