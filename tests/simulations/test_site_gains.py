"""Per-site gains over local training: paired by seed, counted per site."""

import pytest

from simulations.site_gains import site_gains, site_gains_table

SITES = ["site-a", "site-b"]


def _run(method, seed, a, b):
    return {"method": method, "seed": seed, "per_site": {"site-a": {"dice": a}, "site-b": {"dice": b}}}


def _results(*runs):
    return {"sites": SITES, "runs": list(runs)}


def test_gains_are_paired_by_seed_and_only_over_seeds_both_methods_have():
    results = _results(
        _run("local", 0, 0.9, 0.5), _run("local", 1, 0.7, 0.6),
        _run("ditto", 1, 0.75, 0.55), _run("ditto", 0, 0.8, 0.7), _run("ditto", 2, 0.1, 0.1),  # seed 2: no local to pair with
    )
    gains = site_gains(results)
    assert set(gains) == {"ditto"}
    assert gains["ditto"]["site-a"] == pytest.approx(((0.8 - 0.9) + (0.75 - 0.7)) / 2)
    assert gains["ditto"]["site-b"] == pytest.approx(((0.7 - 0.5) + (0.55 - 0.6)) / 2)


def test_the_table_counts_the_sites_where_the_method_beats_local():
    results = _results(_run("local", 0, 0.9, 0.5), _run("fedbn", 0, 0.95, 0.4), _run("same", 0, 0.9, 0.5))
    lines = site_gains_table(results).splitlines()
    assert lines[0] == "| method | site-a | site-b | sites above local |"
    assert lines[2] == "| fedbn | +0.050 | -0.100 | 1/2 |"
    assert lines[3] == "| same | +0.000 | +0.000 | 0/2 |"  # a tie is not a win


def test_no_table_without_a_local_arm():
    assert site_gains_table(_results(_run("fedbn", 0, 0.9, 0.5))) == ""
