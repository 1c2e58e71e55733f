"""Learning curves of a matrix: the mean over sites and seeds per round, cumulative time, and the plateau round."""

import pytest

from simulations.convergence import CurvePoint, convergence_table, method_curves, plateau_round, plot_convergence


def _run(method, seed, dice_by_round, seconds=1.0):
    history = [{"round": r, "dice": dice, "train_s": seconds, "aggregate_s": 0.0, "evaluate_s": 0.5}
               for r, dice in enumerate(dice_by_round, start=1)]
    return {"method": method, "seed": seed, "history": history}


RESULTS = {"runs": [
    _run("local", 0, [{"a": 0.2, "b": 0.4}, {"a": 0.6, "b": 0.8}, {"a": 0.7, "b": 0.7}]),
    _run("local", 1, [{"a": 0.4, "b": 0.4}, {"a": 0.8, "b": 0.8}, {"a": 0.8, "b": 0.8}], seconds=3.0),
    _run("fedbn", 0, [{"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.9}]),
]}


def test_a_methods_curve_is_the_mean_over_sites_then_seeds_with_cumulative_time():
    local = method_curves(RESULTS)["local"]
    assert [p.round for p in local] == [1, 2, 3]
    assert [p.dice for p in local] == pytest.approx([0.35, 0.75, 0.75])
    assert [p.seconds for p in local] == pytest.approx([2.5, 5.0, 7.5])  # mean of (1.5, 3.5) per round, accumulated
    assert local[0].ci is not None and local[0].ci[0] <= 0.35 <= local[0].ci[1]
    assert method_curves(RESULTS)["fedbn"][0].ci is None  # one seed: no interval


def test_only_rounds_every_seed_evaluated_enter_the_curve():
    results = {"runs": [_run("local", 0, [{"a": 0.1}, {"a": 0.2}]), _run("local", 1, [{"a": 0.3}])]}
    assert [p.round for p in method_curves(results)["local"]] == [1]


def test_the_plateau_is_the_first_round_that_stays_near_the_final_dice():
    curve = [CurvePoint(r, d, None, 0.0) for r, d in enumerate([0.1, 0.795, 0.5, 0.792, 0.80, 0.80], start=1)]
    assert plateau_round(curve) == 4  # round 2 is as close but the dip at round 3 leaves the band
    assert plateau_round([]) is None


def test_the_table_names_every_method_and_the_last_round(tmp_path):
    table = convergence_table(RESULTS, columns=2)
    assert "| round 1 |" not in table and "round 2" in table and "round 3" in table
    assert "| local | 0.750" in table and "| fedbn | 0.500 |" in table
    assert plot_convergence(RESULTS, tmp_path / "c.png").stat().st_size > 0


def test_a_fine_tuning_methods_final_score_sits_at_the_end_of_its_budget():
    run = _run("fedbn-ft", 0, [{"a": 0.5}, {"a": 0.7}])
    run["budget_rounds"] = 3  # 2 federated rounds and one round's worth of fine-tuning before the final score
    assert [(p.round, p.dice) for p in method_curves({"runs": [run]})["fedbn-ft"]] == [(1, 0.5), (3, 0.7)]


def test_the_budget_counts_fine_tuning_epochs_in_rounds():
    from simulations.run import budget_rounds

    assert budget_rounds({"rounds": 48, "config": {"finetune-epochs": 12, "local-epochs": 1}}) == 60
    assert budget_rounds({"rounds": 8, "config": {"finetune-epochs": 4, "local-epochs": 2}}) == 10
    assert budget_rounds({"rounds": 20}) == 20
