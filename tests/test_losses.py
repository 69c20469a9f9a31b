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


def test_aspect_bce_leaves_out_the_pairs_the_store_flags_as_bounds():
    # The openai teacher's flags: 2 = no No variant among its top-k (the log-odds are a bound). The flagged pair
    # weighs 0: log 2 alone; keep_bounded keeps both (the plain golden value); with mass weighting only kept pairs count.
    flagged = Batch(BATCH.labels, BATCH.aspect_logodds, BATCH.aspect_mass, aspect_flags=torch.tensor([[0, 2]], dtype=torch.uint8))
    assert aspect_bce(OUT, flagged).item() == pytest.approx(0.6931471805599453, abs=1e-6)
    assert aspect_bce(OUT, flagged, keep_bounded=True).item() == pytest.approx(1.2908346737793415, abs=1e-6)
    assert aspect_bce(OUT, flagged, mass_weighting=True).item() == pytest.approx(0.6931471805599453, abs=1e-6)
    first = Batch(BATCH.labels, BATCH.aspect_logodds, BATCH.aspect_mass, aspect_flags=torch.tensor([[1, 0]], dtype=torch.uint8))
    # softplus(2) - 2 sigmoid(-2), its weight 0.25 divided by the kept weight 0.25
    assert aspect_bce(OUT, first, mass_weighting=True).item() == pytest.approx(1.888522166986733, abs=1e-6)


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


# -- KD terms: each against a direct NumPy formula (float64) and a stored golden number ---------------------------
import numpy as np  # noqa: E402

from makd.losses import dkd, kd, lskd  # noqa: E402

S = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 1.5, 0.3, -0.7]])  # student class logits
T_ = np.array([[3.0, 1.0, -2.0, 0.5], [-0.5, 2.5, 1.0, 0.0]])  # teacher class logits
Y = np.array([0, 2])
KD_BATCH = Batch(labels=torch.tensor(Y), teacher_logits=torch.tensor(T_, dtype=torch.float32))
KD_OUT = StudentOutput(torch.tensor(S, dtype=torch.float32), None)


def np_softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_kl(q, p):  # KL(q ‖ p) per row
    return (q * (np.log(q) - np.log(p))).sum(axis=1)


def np_kd(s, t, temp):
    return temp**2 * np_kl(np_softmax(t / temp), np_softmax(s / temp)).mean()


def np_zscore(x):
    return (x - x.mean(axis=1, keepdims=True)) / (1e-7 + x.std(axis=1, ddof=1, keepdims=True))


def np_dkd(s, t, y, alpha, beta, temp):
    """The DKD paper's definitions: binary (target, rest) KL + KL over the renormalised non-target classes."""
    p_s, p_t = np_softmax(s / temp), np_softmax(t / temp)
    rows = np.arange(len(y))
    b_s = np.stack([p_s[rows, y], 1 - p_s[rows, y]], 1)
    b_t = np.stack([p_t[rows, y], 1 - p_t[rows, y]], 1)
    others = np.ones_like(s, dtype=bool)
    others[rows, y] = False
    n_s = p_s[others].reshape(len(y), -1)
    n_t = p_t[others].reshape(len(y), -1)
    n_s, n_t = n_s / n_s.sum(1, keepdims=True), n_t / n_t.sum(1, keepdims=True)
    return temp**2 * (alpha * np_kl(b_t, b_s) + beta * np_kl(n_t, n_s)).mean()


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_matches_hinton_formula(temp):
    assert kd(KD_OUT, KD_BATCH, temperature=temp).item() == pytest.approx(np_kd(S, T_, temp), rel=1e-5)


def test_kd_golden():
    assert np_kd(S, T_, 4.0) == pytest.approx(0.18461986, abs=1e-6)
    assert kd(KD_OUT, KD_BATCH, temperature=4.0).item() == pytest.approx(0.18461986, abs=1e-5)


def test_kd_is_zero_when_student_equals_teacher():
    same = StudentOutput(torch.tensor(T_, dtype=torch.float32), None)
    assert kd(same, KD_BATCH).item() == pytest.approx(0.0, abs=1e-6)


def test_lskd_matches_standardised_formula_and_ignores_logit_scale():
    expected = np_kd(np_zscore(S), np_zscore(T_), 2.0)
    assert lskd(KD_OUT, KD_BATCH).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.0408727, abs=1e-6)
    # A student whose logits are the teacher's scaled and shifted has zero loss after standardisation.
    scaled = StudentOutput(torch.tensor(0.3 * T_ + 5, dtype=torch.float32), None)
    assert lskd(scaled, KD_BATCH).item() == pytest.approx(0.0, abs=1e-5)
    assert kd(scaled, KD_BATCH).item() > 0.1


@pytest.mark.parametrize("alpha, beta, temp", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_decoupled_definition(alpha, beta, temp):
    got = dkd(KD_OUT, KD_BATCH, alpha=alpha, beta=beta, temperature=temp).item()
    assert got == pytest.approx(np_dkd(S, T_, Y, alpha, beta, temp), rel=1e-4)


def test_dkd_golden_and_warmup():
    assert np_dkd(S, T_, Y, 1.0, 8.0, 4.0) == pytest.approx(1.70580278, abs=1e-6)
    full = dkd(KD_OUT, KD_BATCH).item()
    assert full == pytest.approx(1.70580278, rel=1e-4)
    half = Batch(labels=KD_BATCH.labels, teacher_logits=KD_BATCH.teacher_logits, epoch=5.0)
    assert dkd(KD_OUT, half, warmup_epochs=20).item() == pytest.approx(full / 4, rel=1e-5)


def test_makd_plus_kd_is_one_config_away():
    from makd.config import load_config

    config = load_config(overrides=["loss.kd.weight=1", "loss.kd.temperature=2"])
    loss = WeightedLoss(config.loss)
    assert loss.needs_aspects and loss.needs_teacher
    out = StudentOutput(KD_OUT.class_logits, torch.zeros(2, 2))
    batch = Batch(KD_BATCH.labels, torch.zeros(2, 2), torch.ones(2, 2), KD_BATCH.teacher_logits)
    total, parts = loss(out, batch)
    assert set(parts) == {"ce", "aspect_bce", "kd"}
    assert parts["kd"].item() == pytest.approx(np_kd(S, T_, 2.0), rel=1e-5)
    # CE + 4 · BCE(0 logits, targets sigmoid(0)) = CE + 4 log 2, + 1 · KD: not the sum of `parts`, which it is built from
    ce = -np.log(np_softmax(S)[np.arange(2), Y]).mean()
    assert total.item() == pytest.approx(ce + 4 * np.log(2) + np_kd(S, T_, 2.0), rel=1e-6)
    with pytest.raises(MakdError, match="loss.kd needs a KD teacher"):
        kd(KD_OUT, Batch(labels=KD_BATCH.labels))
