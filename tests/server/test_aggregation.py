"""Aggregation of shared keys: weighted mean, dtypes kept, replies not consumed."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from server.strategy import STRATEGIES, StrategyConfigError, aggregate_shared, make_strategy
from tests.helpers import make_reply, set_task_identity

REFERENCE = ArrayRecord(
    {
        "conv.weight": Array(np.zeros((2, 2), np.float32)),
        "norm.num_batches_tracked": Array(np.array(0, np.int64)),
    }
)


def _replies():
    return [
        make_reply({"conv.weight": np.full((2, 2), 1.0, np.float32), "norm.num_batches_tracked": np.array(5, np.int64)}, 10, 1),
        make_reply({"conv.weight": np.full((2, 2), 4.0, np.float32), "norm.num_batches_tracked": np.array(8, np.int64)}, 30, 2),
    ]


def test_fedavg_is_the_num_examples_weighted_mean_and_keeps_dtypes():
    arrays, _ = aggregate_shared(make_strategy("fedavg", 2), 1, _replies(), REFERENCE)
    weight = arrays["conv.weight"].numpy()
    np.testing.assert_allclose(weight, np.full((2, 2), (10 * 1.0 + 30 * 4.0) / 40), rtol=1e-6)
    assert weight.dtype == np.float32
    counter = arrays["norm.num_batches_tracked"].numpy()
    assert counter.dtype == np.int64 and counter.shape == REFERENCE["norm.num_batches_tracked"].numpy().shape
    assert int(counter.reshape(())) == 7  # round(7.25)


def test_only_keys_of_the_reference_come_back():
    arrays, _ = aggregate_shared(make_strategy("fedavg", 2), 1, _replies(), REFERENCE)
    assert set(arrays.keys()) == set(REFERENCE.keys())


@pytest.mark.parametrize("name,expected", [("fedmedian", 2.0), ("fedtrimmedavg", 7 / 3)])  # beta=0.2 trims nothing of 3
def test_robust_strategies_do_not_consume_the_replies(name, expected):
    replies = _replies() + [make_reply({"conv.weight": np.full((2, 2), 2.0, np.float32), "norm.num_batches_tracked": np.array(6, np.int64)}, 20, 3)]
    arrays, _ = aggregate_shared(make_strategy(name, 3), 1, replies, REFERENCE)
    assert all(len(r.content["arrays"]) == 2 for r in replies)
    np.testing.assert_allclose(arrays["conv.weight"].numpy(), np.full((2, 2), expected), rtol=1e-6)


def test_fedprox_and_fedadam_aggregate():
    set_task_identity()
    from server.strategy import TargetedGrid

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    for name in ("fedprox", "fedadam"):
        strategy = make_strategy(name, 2)
        from flwr.app import ConfigRecord

        messages = list(strategy.configure_train(1, REFERENCE, ConfigRecord(), TargetedGrid(Grid(), [1, 2])))
        assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
        arrays, _ = aggregate_shared(strategy, 1, _replies(), REFERENCE)
        assert np.isfinite(arrays["conv.weight"].numpy()).all()
        assert arrays["norm.num_batches_tracked"].numpy().dtype == np.int64


def test_fedprox_sends_its_mu():
    set_task_identity()
    from flwr.app import ConfigRecord

    from server.strategy import TargetedGrid

    class Grid:
        def get_node_ids(self):
            return [1]

    strategy = make_strategy("fedprox", 1, {"proximal_mu": 0.5})
    (message,) = strategy.configure_train(1, REFERENCE, ConfigRecord(), TargetedGrid(Grid(), [1]))
    assert message.content["config"]["proximal-mu"] == 0.5


def test_nothing_shared_means_nothing_to_aggregate():
    arrays, _ = aggregate_shared(make_strategy("fedavg", 2), 1, [], ArrayRecord())
    assert len(arrays) == 0


def test_unknown_strategy_and_option():
    with pytest.raises(StrategyConfigError, match="unknown strategy"):
        make_strategy("fedsgd", 2)
    with pytest.raises(StrategyConfigError, match="unknown options"):
        make_strategy("fedavg", 2, {"beta": 0.1})
    assert "fedavg" in STRATEGIES


BN_REFERENCE = ArrayRecord(
    {
        "conv.weight": Array(np.zeros((3,), np.float32)),
        "bn.running_var": Array(np.ones((3,), np.float32)),
        "bn.num_batches_tracked": Array(np.array(0, np.int64)),
    }
)


def _bn_replies(weights, counts, n=(10, 30)):
    return [
        make_reply({"conv.weight": np.full((3,), w, np.float32), "bn.running_var": np.full((3,), 6.0, np.float32),
                    "bn.num_batches_tracked": np.array(c, np.int64)}, n_i, node)
        for node, (w, c, n_i) in enumerate(zip(weights, counts, n), start=1)
    ]


SERVER_OPTIMIZERS = ["fedadam", "fedyogi", "fedadagrad", "fedavgm"]


def _federate(name, rounds, replies_of, reference, parameter_keys=None, strategy=None, first=1):
    """Rounds ``first``..``rounds`` of ``name`` as the server loop runs them: configure_train, then aggregate_shared."""
    set_task_identity()
    from flwr.app import ConfigRecord

    from server.strategy import TargetedGrid

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    strategy, global_arrays, trail = strategy or make_strategy(name, 2), reference, []
    for rnd in range(first, rounds + 1):
        list(strategy.configure_train(rnd, global_arrays, ConfigRecord(), TargetedGrid(Grid(), [1, 2])))
        global_arrays, _ = aggregate_shared(strategy, rnd, replies_of(rnd), global_arrays, parameter_keys=parameter_keys)
        trail.append(global_arrays)
    return trail


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_server_optimizers_step_on_parameters_only(name):
    """Sites all report running_var 6: after 20 rounds the global value is 6 (the weighted mean), not an optimizer's trail."""
    trail = _federate(name, 20, lambda rnd: _bn_replies([1.0, 2.0], [4 * rnd, 8 * rnd]), BN_REFERENCE, {"conv.weight"})
    global_arrays = trail[-1]
    np.testing.assert_allclose(global_arrays["bn.running_var"].numpy(), np.full((3,), 6.0), rtol=1e-6)
    assert int(global_arrays["bn.num_batches_tracked"].numpy()) == round((10 * 80 + 30 * 160) / 40)
    weight = global_arrays["conv.weight"].numpy()
    assert weight.dtype == np.float32 and not np.allclose(weight, 0.0)  # the parameters did move
    if name == "fedadam":  # and by the server optimizer's rule, not as a plain mean would
        assert not np.allclose(weight, (10 * 1.0 + 30 * 2.0) / 40)


def _site_weights(rnd):
    """Sites whose parameters wander, so the optimizer's moments matter round after round."""
    return [np.sin(rnd) + 1.0, 2.0 + 0.5 * np.cos(3 * rnd)]


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_the_parameters_follow_the_server_optimizer_exactly_as_without_statistics(name):
    """Splitting off the statistics leaves the optimizer's trajectory on the parameters bit for bit."""
    with_stats = _federate(name, 8, lambda rnd: _bn_replies(_site_weights(rnd), [rnd, 2 * rnd]), BN_REFERENCE, {"conv.weight"})
    only_params = ArrayRecord({"conv.weight": BN_REFERENCE["conv.weight"]})

    def param_replies(rnd):
        return [make_reply({"conv.weight": np.full((3,), w, np.float32)}, n, node) for node, (w, n) in enumerate(zip(_site_weights(rnd), (10, 30)), 1)]

    alone = _federate(name, 8, param_replies, only_params)
    for a, b in zip(with_stats, alone):
        np.testing.assert_array_equal(a["conv.weight"].numpy(), b["conv.weight"].numpy())
    assert len({round(float(a["conv.weight"].numpy()[0]), 6) for a in alone}) == 8  # it moved every round


def test_fedadam_first_round_is_the_adam_step_on_the_parameters():
    """x1 = x0 + eta_norm * m1 / (sqrt(v1) + tau), m1 = (1 - b1) d, v1 = (1 - b2) d^2, d = weighted mean - x0."""
    (first,) = _federate("fedadam", 1, lambda rnd: _bn_replies([1.0, 2.0], [3, 5]), BN_REFERENCE, {"conv.weight"})
    strategy = make_strategy("fedadam", 2)
    b1, b2, eta, tau = strategy.beta_1, strategy.beta_2, strategy.eta, strategy.tau
    d = (10 * 1.0 + 30 * 2.0) / 40 - 0.0
    eta_norm = eta * np.sqrt(1 - b2**2) / (1 - b1**2)  # Flower's bias correction at server_round + 1
    expected = eta_norm * (1 - b1) * d / (np.sqrt((1 - b2) * d * d) + tau)
    np.testing.assert_allclose(first["conv.weight"].numpy(), np.full((3,), expected), rtol=1e-5)
    np.testing.assert_allclose(first["bn.running_var"].numpy(), np.full((3,), 6.0))
    assert int(first["bn.num_batches_tracked"].numpy()) == round((10 * 3 + 30 * 5) / 40)


def test_fedadam_without_parameter_keys_moves_statistics_as_flower_does():
    """The failure the split prevents: Flower's FedAdam alone drags running_var with an Adam step."""
    trail = _federate("fedadam", 20, lambda rnd: _bn_replies([1.0, 2.0], [4, 8]), BN_REFERENCE)
    assert abs(float(trail[-1]["bn.running_var"].numpy()[0]) - 6.0) > 1.0


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_a_resumed_server_optimizer_continues_the_uninterrupted_trajectory(name, tmp_path):
    """The optimizer's state (Adam moments, FedAvgM momentum) goes through the checkpoint and back."""
    from server.checkpoint import CheckpointStore, ServerCheckpoint, arrays_to_tensors, resume, strategy_state, tensors_to_arrays

    def replies_of(rnd):
        return _bn_replies(_site_weights(rnd), [rnd, 2 * rnd])

    uninterrupted = _federate(name, 6, replies_of, BN_REFERENCE, {"conv.weight"})
    strategy = make_strategy(name, 2)
    third = _federate(name, 3, replies_of, BN_REFERENCE, {"conv.weight"}, strategy=strategy)[-1]
    store = CheckpointStore(tmp_path)
    store.save(ServerCheckpoint(3, "run", "fp", "fedavg", arrays_to_tensors(third), strategy_state(strategy), []))
    fresh = make_strategy(name, 2)
    ckpt = resume(store, fresh, run_name="run", fingerprint="fp", policy="fedavg")
    resumed = _federate(name, 6, replies_of, tensors_to_arrays(ckpt.arrays), {"conv.weight"}, strategy=fresh, first=4)
    for a, b in zip(uninterrupted[3:], resumed):
        for key in BN_REFERENCE:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_moments_of_statistics_from_an_older_checkpoint_are_dropped_not_fatal():
    """Adam moments that still name statistics (saved before they were split off) must not make every round fail."""
    strategy = make_strategy("fedadam", 2)
    strategy.m_t = {k: np.zeros_like(BN_REFERENCE[k].numpy(), dtype=np.float64) for k in BN_REFERENCE}
    strategy.v_t = {k: np.ones_like(BN_REFERENCE[k].numpy(), dtype=np.float64) for k in BN_REFERENCE}
    (first,) = _federate("fedadam", 1, lambda rnd: _bn_replies([1.0, 2.0], [3, 5]), BN_REFERENCE, {"conv.weight"}, strategy=strategy)
    np.testing.assert_allclose(first["bn.running_var"].numpy(), np.full((3,), 6.0))
    assert set(strategy.m_t) == set(strategy.v_t) == {"conv.weight"}
    assert not np.allclose(first["conv.weight"].numpy(), 0.0)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_registered_strategy_builds_takes_its_options_and_aggregates(name):
    """The registry tests itself: each option reaches Flower's strategy, and a round aggregates with dtypes kept."""
    from server.strategy import STRATEGY_REGISTRY

    options = STRATEGY_REGISTRY[name].options
    changed = {k: type(v)(v * 2 if isinstance(v, float) else v + 1) for k, v in options.items()}
    strategy = make_strategy(name, 3, changed)
    assert {k: getattr(strategy, k) for k in changed} == changed
    with pytest.raises(StrategyConfigError) as err:
        make_strategy(name, 3, {"no_such_option": 1})
    message = str(err.value)
    assert "\n" not in message and name in message and all(k in message for k in options)
    arrays = _federate(name, 2, lambda rnd: _replies(), REFERENCE, {"conv.weight"})[-1]
    assert np.isfinite(arrays["conv.weight"].numpy()).all() and arrays["conv.weight"].numpy().dtype == np.float32
    assert arrays["norm.num_batches_tracked"].numpy().dtype == np.int64


def test_the_operations_guide_names_every_registered_strategy():
    from pathlib import Path

    guide = (Path(__file__).parents[2] / "deploy" / "OPERATIONS.md").read_text()
    assert all(name in guide for name in STRATEGIES)
