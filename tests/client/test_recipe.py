"""The local recipe: schedule math, the optimizer registry, and an optimizer that really continues across rounds."""

import math

import pytest
import torch

from client.optim_recipe import OPTIMIZERS, build_optimizer, load_moments
from client.schedule import SCHEDULES, LrSchedule, RoundPosition, TailPosition, lr_factor
from client.trainer import TrainSettings, batches_per_epoch, train_local
from shared_models import build_model
from tests.helpers import toy_segmentation
from shared_models.losses import segmentation_loss
from shared_models.norms.bin import BatchInstanceNorm
from shared_models.protocol import LR_SCHEDULES, OPTIMIZERS as PROTOCOL_OPTIMIZERS

SPEC = {"name": "unet", "channels": [4, 8], "norm": "batch", "out-channels": 3}


def _data(n=8, size=16):
    return toy_segmentation(n, size, noise=0.3)


# ---- schedule -------------------------------------------------------------------------------------------------------


def test_the_registries_are_the_contracts_choices():
    assert tuple(SCHEDULES) == LR_SCHEDULES and tuple(OPTIMIZERS) == PROTOCOL_OPTIMIZERS


@pytest.mark.parametrize("name", LR_SCHEDULES)
def test_every_schedule_starts_at_the_base_rate_and_never_rises(name):
    total = 50
    values = [lr_factor(name, t, total) for t in range(total + 1)]
    assert values[0] == 1.0
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert values[total] == (1.0 if name == "constant" else pytest.approx(0.0, abs=1e-12))
    assert all(v > 0 for v in values[:total])  # every step the trainer takes (t < T) moves the weights


def test_poly_and_cosine_are_the_published_formulas():
    total = 40
    for t in (0, 7, 20, 39):
        assert lr_factor("poly", t, total) == pytest.approx((1 - t / total) ** 0.9)
        assert lr_factor("cosine", t, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * t / total)))
    assert lr_factor("cosine", 20, 40) == pytest.approx(0.5)


def test_warm_up_rises_linearly_then_the_schedule_decays_over_the_rest():
    total, fraction = 100, 0.1  # ten warm-up steps
    warm = [lr_factor("poly", t, total, fraction) for t in range(10)]
    assert warm[0] == pytest.approx(1 / 11) and warm[9] == pytest.approx(10 / 11)
    assert all(b - a == pytest.approx(1 / 11) for a, b in zip(warm, warm[1:]))
    assert lr_factor("poly", 10, total, fraction) == 1.0  # the peak right after warm-up
    assert lr_factor("poly", 55, total, fraction) == pytest.approx(0.5 ** 0.9)  # half-way through the decay phase
    assert lr_factor("poly", total, total, fraction) == pytest.approx(0.0)
    assert lr_factor("constant", 3, total, fraction) == pytest.approx(4 / 11)


def test_unknown_schedule_or_empty_span_is_refused():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        lr_factor("step", 0, 10)
    with pytest.raises(ValueError, match="at least one step"):
        lr_factor("poly", 0, 0)


def test_a_round_sits_at_its_place_in_the_federation():
    assert RoundPosition(3, 10).span(7) == (14, 70)
    assert RoundPosition(1, 1).span(5) == (0, 5)
    assert RoundPosition(4, 0).span(5) == (15, 20)  # unknown length: the schedule ends with this round
    assert RoundPosition(0, 3).span(5) == (0, 15)


@pytest.mark.parametrize("n,batch_size", [(8, 4), (9, 4), (10, 4), (3, 8), (5, 2)])
def test_steps_per_epoch_match_the_batches_the_loop_takes(n, batch_size):
    images, labels = _data(n)
    settings = TrainSettings(epochs=2, batch_size=batch_size, augment=False)
    report = train_local(build_model(SPEC, seed=0), images, labels, settings, segmentation_loss())
    assert report.steps == 2 * batches_per_epoch(n, batch_size)


def test_the_schedule_scales_every_group_from_its_own_base_rate():
    model = build_model({**SPEC, "norm": "bin"}, seed=0)
    optimizer = build_optimizer(model, TrainSettings(lr=0.01))
    bases = sorted(g["lr"] for g in optimizer.param_groups)
    assert bases == pytest.approx([0.01, 0.1])  # BIN's rho: 10x
    schedule = LrSchedule(optimizer, "cosine", 0.0, first_step=10, total=20)
    assert schedule.set(0) == pytest.approx(0.5)  # global step 10 of 20
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([0.005, 0.05])


# ---- optimizer registry ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kind", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_each_optimizer_is_built_over_the_norm_parameter_groups(name, kind):
    model = build_model({**SPEC, "norm": "bin"}, seed=0)
    optimizer = build_optimizer(model, TrainSettings(optimizer=name, lr=0.01, weight_decay=0.1))
    assert type(optimizer) is kind
    rhos = {id(m.rho) for m in model.modules() if isinstance(m, BatchInstanceNorm)}
    (rho_group,) = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} == rhos]
    assert rho_group["lr"] == pytest.approx(0.1) and rho_group["weight_decay"] == 0.0
    covered = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    if name == "sgd":
        assert all(g["momentum"] == 0.99 and g["nesterov"] for g in optimizer.param_groups)


def test_an_unknown_optimizer_is_refused_naming_it():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        build_optimizer(build_model(SPEC, seed=0), TrainSettings(optimizer="lion"))


def test_loading_moments_keeps_this_rounds_hyperparameters():
    model = build_model(SPEC, seed=0)
    old = build_optimizer(model, TrainSettings(lr=0.5, weight_decay=0.2))
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    old.step()
    new = build_optimizer(model, TrainSettings(lr=0.01))
    load_moments(new, old.state_dict())
    assert all(g["lr"] == 0.01 and g["weight_decay"] == 0.0 for g in new.param_groups)
    assert float(next(iter(new.state.values()))["step"]) == 1.0
    other = build_model({**SPEC, "channels": [4, 6]}, seed=0)
    with pytest.raises(ValueError, match="shape"):
        load_moments(build_optimizer(other, TrainSettings()), old.state_dict())


# ---- the optimizer continues across rounds --------------------------------------------------------------------------

# one batch of every sample: the two-round and the one-call runs take the same steps on the same batch
CONTINUOUS = dict(batch_size=8, augment=False, schedule="poly", lr=1e-2)


def _same_cases(n=8):
    """``n`` copies of one case: any shuffle gives the bit-identical batch."""
    images, labels = _data(1)
    return images.repeat(n, 1, 1, 1), labels.repeat(n, 1, 1, 1)


def _stored(report):
    from client.optim_state import StoredOptimizer

    return StoredOptimizer(report.optimizer_state, 1, "test")


def _first_state(report):
    return next(iter(report.optimizer_state["state"].values()))


def test_two_persisted_rounds_equal_one_continuous_optimizer():
    images, labels = _same_cases()
    loss_fn = segmentation_loss()
    continuous = build_model(SPEC, seed=0)
    whole = train_local(continuous, images, labels, TrainSettings(epochs=4, **CONTINUOUS), loss_fn)
    rounds = build_model(SPEC, seed=0)
    first = train_local(rounds, images, labels, TrainSettings(epochs=2, **CONTINUOUS), loss_fn, position=RoundPosition(1, 2))
    second = train_local(rounds, images, labels, TrainSettings(epochs=2, **CONTINUOUS), loss_fn, position=RoundPosition(2, 2),
                         optimizer_state=_stored(first))
    assert float(_first_state(second)["step"]) == float(_first_state(whole)["step"]) == 4.0
    for a, b in zip(second.optimizer_state["state"].values(), whole.optimizer_state["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    for (k, a), b in zip(rounds.state_dict().items(), continuous.state_dict().values()):
        assert torch.equal(a, b), k


def test_reset_optimizer_starts_fresh_each_round():
    images, labels = _data()
    loss_fn = segmentation_loss()
    model = build_model(SPEC, seed=0)
    first = train_local(model, images, labels, TrainSettings(epochs=2, **CONTINUOUS), loss_fn, position=RoundPosition(1, 2))
    settings = TrainSettings(epochs=2, persist_optimizer=False, **CONTINUOUS)
    second = train_local(model, images, labels, settings, loss_fn, position=RoundPosition(2, 2), optimizer_state=_stored(first))
    assert float(_first_state(second)["step"]) == 2.0


def _recording_rates(monkeypatch) -> list[float]:
    rates = []
    original = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    return rates


def test_the_last_round_ends_near_a_zero_learning_rate(monkeypatch):
    rates = _recording_rates(monkeypatch)
    images, labels = _data()
    train_local(build_model(SPEC, seed=0), images, labels, TrainSettings(epochs=2, batch_size=4, augment=False, lr=1.0),
                segmentation_loss(), position=RoundPosition(3, 3))
    total = 3 * 2 * 2  # rounds x epochs x batches
    assert rates == pytest.approx([(1 - t / total) ** 0.9 for t in range(8, 12)])


def test_a_fine_tuning_tail_ends_the_rounds_schedule():
    # 4 rounds of 2 epochs and 3 epochs of fine-tuning, 5 steps per epoch: 40 + 15 steps in one schedule
    assert RoundPosition(1, 4, tail_epochs=3, round_epochs=2).span(10) == (0, 55)
    assert RoundPosition(4, 4, tail_epochs=3, round_epochs=2).span(10) == (30, 55)
    assert TailPosition(4, 2, 3).span(15) == (40, 55)


def test_rounds_then_site_fine_tuning_follow_the_schedule_of_one_local_run(monkeypatch):
    """A ``-ft`` method's learning rates: the rounds do not decay to 0 and fine-tuning does not restart at the
    base rate; together they are the rates of a local run as long as the whole budget."""
    from client.personalise import finetune
    from client.trainer import TensorBatches
    from shared_models.protocol import RoundConfig

    rates = _recording_rates(monkeypatch)
    images, labels = _data()
    settings = TrainSettings(epochs=1, batch_size=4, augment=False, lr=1.0)
    model = build_model(SPEC, seed=0)
    report = None
    for rnd in (1, 2):
        report = train_local(model, images, labels, settings, segmentation_loss(),
                             position=RoundPosition(rnd, 2, tail_epochs=2, round_epochs=1),
                             optimizer_state=_stored(report) if report else None)
    cfg = RoundConfig(run_name="ft", model_spec=SPEC, fingerprint="", server_round=2, num_rounds=2, train=settings,
                      finetune_epochs=2)
    tuned = finetune(model, lambda s: TensorBatches(images, labels, s.batch_size, s.seed), cfg, _stored(report))
    total = 4 * 2  # (2 rounds + 2 fine-tuning epochs) x 2 batches
    assert rates == pytest.approx([(1 - t / total) ** 0.9 for t in range(total)])
    assert float(_first_state(tuned)["step"]) == total  # the site's optimizer continued, it was not rebuilt
