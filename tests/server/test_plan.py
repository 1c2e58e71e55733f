"""The planner: hand-made fingerprints -> network, batch, classes; disagreeing sites are named."""

import pytest

from server.plan import PlanError, downsamplings_for, make_plan, widths_for
from tests.helpers import fingerprint


def four_sites(**kwargs):
    return [fingerprint(site=f"site-{s}", **kwargs) for s in "abcd"]


def test_100x100_slices_get_a_four_level_unet():
    plan = make_plan(four_sites(shape=(100, 100)))
    assert plan.channels == (16, 32, 64, 128)
    assert plan.downsamplings == 3 and plan.bottleneck == (12, 12)
    assert plan.model_spec == {"name": "unet", "channels": [16, 32, 64, 128], "norm": "batch"}
    assert (plan.spatial_dims, plan.patch_shape, plan.batch_size, plan.lr, plan.optimizer) == (2, (100, 100), 8, 1e-2, "adam")
    assert plan.num_classes == 4 and plan.classes == (0, 1, 2, 3)


def test_48x48_slices_get_a_shallower_net():
    plan = make_plan(four_sites(shape=(48, 48)))
    assert plan.channels == (16, 32, 64) and plan.bottleneck == (12, 12)


def test_patch_is_the_median_over_sites_and_depth_follows_its_smallest_side():
    sites = [fingerprint("a", (90, 200)), fingerprint("b", (100, 220)), fingerprint("c", (300, 300))]
    plan = make_plan(sites)
    assert plan.patch_shape == (100, 220)
    assert plan.downsamplings == 3  # 100 -> 12 (>= 8); one more would give 6


@pytest.mark.parametrize("side, levels", [(8, 2), (16, 2), (32, 2), (63, 2), (64, 3), (256, 5), (4096, 5)])
def test_depth_is_clamped_between_2_and_5(side, levels):
    assert downsamplings_for((side, side)) == levels


def test_widths_double_and_are_capped():
    assert widths_for(5) == (16, 32, 64, 128, 256, 256)
    assert widths_for(3, max_width=64) == (16, 32, 64, 64)


def test_3d_small_volumes_get_batch_2():
    plan = make_plan(four_sites(shape=(32, 32, 32), spacing=[1.0, 1.0, 2.5]))
    assert plan.spatial_dims == 3 and plan.batch_size == 2
    assert plan.channels == (16, 32, 64) and plan.bottleneck == (8, 8, 8)
    assert plan.spacing == (1.0, 1.0, 2.5)


def test_batch_is_capped_by_the_smallest_training_site():
    sites = four_sites()[:3] + [fingerprint("site-d", num_train=5)]
    plan = make_plan(sites)
    assert plan.batch_size == 5 and "site-d" in plan.reasons["batch_size"]
    # a site that never trains (held out) does not cap it
    assert make_plan(sites, training_sites={"site-a", "site-b", "site-c"}).batch_size == 8


def test_classes_are_the_union_across_sites():
    plan = make_plan([fingerprint("a", classes=(0, 1)), fingerprint("b", classes=(0, 2, 3)), fingerprint("c", classes=(1, 2))])
    assert plan.classes == (0, 1, 2, 3) and plan.num_classes == 4


def test_a_site_with_another_label_map_is_named():
    with pytest.raises(PlanError, match=r"^site site-c: label values \[7\] but \[4, 5, 6\] appear at no site") as err:
        make_plan([fingerprint("site-a"), fingerprint("site-b"), fingerprint("site-c", classes=(0, 1, 7))])
    assert "\n" not in str(err.value)


def test_a_gap_every_site_shares_is_no_disagreement():
    plan = make_plan([fingerprint("a", classes=(0, 1, 3)), fingerprint("b", classes=(0, 3))])
    assert plan.classes == (0, 1, 3) and plan.num_classes == 4  # outputs 0..3, as the data loader infers


def test_labels_without_any_foreground_are_refused():
    with pytest.raises(PlanError, match="no site has a foreground class"):
        make_plan([fingerprint("site-a", classes=(0,)), fingerprint("site-b", classes=(0,))])


def test_a_site_of_other_dims_is_named():
    sites = four_sites(shape=(64, 64))
    sites[2] = fingerprint("site-c", shape=(64, 64, 32))
    with pytest.raises(PlanError, match="^site site-c: 3D images, the other sites' are 2D$"):
        make_plan(sites)


def test_no_fingerprint_is_an_error():
    with pytest.raises(PlanError):
        make_plan([])


def test_3d_volumes_train_on_patches_capped_and_divisible_by_the_stride_at_the_median_spacing():
    from server.plan import MAX_PATCH

    sites = [fingerprint("a", shape=(85, 100, 78), spacing=(2.0, 2.0, 2.0)), fingerprint("b", shape=(300, 140, 60), spacing=(2.0, 2.0, 4.0)),
             fingerprint("c", shape=(90, 110, 80), spacing=(1.0, 2.0, 2.0))]
    plan = make_plan(sites)
    stride = 2**plan.downsamplings
    assert plan.patch_size == plan.patch_shape and len(plan.patch_size) == 3
    assert all(v <= MAX_PATCH[3] and v % stride == 0 for v in plan.patch_size)
    assert plan.patch_size == (88, 96, 72)  # medians 90, 110 -> 96, 78 -> 72 at stride 8
    assert plan.target_spacing == (2.0, 2.0, 2.0)


def test_2d_slices_train_whole_unless_a_side_exceeds_the_cap():
    assert make_plan([fingerprint("a", shape=(100, 120))]).patch_size == ()
    large = make_plan([fingerprint("a", shape=(1024, 600), spacing=(0.5, 0.5))])
    assert large.patch_size == (512, 512) and large.target_spacing == (0.5, 0.5)
