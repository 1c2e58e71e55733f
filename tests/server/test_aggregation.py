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


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_server_optimizers_step_on_parameters_only(name):
    """Sites all report running_var 6: after 20 rounds the global value is 6 (the weighted mean), not an optimizer's trail."""
    set_task_identity()
    from flwr.app import ConfigRecord

    from server.strategy import TargetedGrid

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    strategy, global_arrays = make_strategy(name, 2), BN_REFERENCE
    for rnd in range(1, 21):
        list(strategy.configure_train(rnd, global_arrays, ConfigRecord(), TargetedGrid(Grid(), [1, 2])))
        replies = _bn_replies([1.0, 2.0], [4 * rnd, 8 * rnd])
        global_arrays, _ = aggregate_shared(strategy, rnd, replies, global_arrays, parameter_keys={"conv.weight"})
    np.testing.assert_allclose(global_arrays["bn.running_var"].numpy(), np.full((3,), 6.0), rtol=1e-6)
    assert int(global_arrays["bn.num_batches_tracked"].numpy()) == round((10 * 80 + 30 * 160) / 40)
    weight = global_arrays["conv.weight"].numpy()
    assert weight.dtype == np.float32 and not np.allclose(weight, 0.0)  # the parameters did move
    if name == "fedadam":  # and by the server optimizer's rule, not as a plain mean would
        assert not np.allclose(weight, (10 * 1.0 + 30 * 2.0) / 40)


def test_fedadam_without_parameter_keys_moves_statistics_as_flower_does():
    """The failure the split prevents: Flower's FedAdam alone drags running_var with an Adam step."""
    set_task_identity()
    from flwr.app import ConfigRecord

    from server.strategy import TargetedGrid

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    strategy, global_arrays = make_strategy("fedadam", 2), BN_REFERENCE
    for rnd in range(1, 21):
        list(strategy.configure_train(rnd, global_arrays, ConfigRecord(), TargetedGrid(Grid(), [1, 2])))
        global_arrays, _ = aggregate_shared(strategy, rnd, _bn_replies([1.0, 2.0], [4, 8]), global_arrays)
    assert abs(float(global_arrays["bn.running_var"].numpy()[0]) - 6.0) > 1.0
