"""Ring-allreduce cost model and projection against values worked out by hand."""
import math

import pytest

from tsm_dist.studies.scaling.costmodel import (LinkCost, allreduce_time_on_nodes, fit_ring_link,
                                        small_allreduce_time, unmodelled_overhead,
                                        project_step_time, ring_allreduce_time)


def test_ring_time_hand_values():
    # p=4, N=1e8 B, alpha=10 us, B=10 GB/s: 2*3*10e-6 + 2*3/4 * 1e8/1e10 = 6e-5 + 0.015
    assert ring_allreduce_time(4, 1e8, LinkCost(10e-6, 10e9)) == pytest.approx(0.01506, rel=1e-12)
    # p=2, N=1e6 B, alpha=1 us, B=1 GB/s: 2e-6 + 1e-3
    assert ring_allreduce_time(2, 1e6, LinkCost(1e-6, 1e9)) == pytest.approx(0.001002, rel=1e-12)
    # one participant sends nothing
    assert ring_allreduce_time(1, 1e9, LinkCost(1.0, 1.0)) == 0.0


def test_ring_time_bandwidth_term_tends_to_twice_n_over_b():
    link = LinkCost(0.0, 1e9)
    assert ring_allreduce_time(10_000, 1e9, link) == pytest.approx(2.0, rel=1e-3)


def test_fit_recovers_alpha_and_bandwidth():
    link = LinkCost(5e-6, 2e9)
    sizes = [4096 * 4 ** i for i in range(8)]
    times = [ring_allreduce_time(4, n, link) for n in sizes]
    fitted = fit_ring_link(4, sizes, times)
    assert fitted.alpha_s == pytest.approx(5e-6, rel=1e-6)
    assert fitted.bandwidth_bytes_per_s == pytest.approx(2e9, rel=1e-9)


def test_fit_hand_values_two_ranks():
    # t = a + b*N with a = 2 ms, b = 1 ns/B on 2 ranks: alpha = a/2 = 1 ms, B = 2*1/(2*1e-9) = 1e9
    fitted = fit_ring_link(2, [1, 1000, 2000], [0.002000001, 0.002001, 0.002002])
    assert fitted.alpha_s == pytest.approx(1e-3)
    assert fitted.bandwidth_bytes_per_s == pytest.approx(1e9)


@pytest.mark.parametrize("p, sizes, times", [(1, [1, 2], [1, 2]), (2, [1], [1]), (2, [5, 5], [1, 2]),
                                              (2, [1, 2], [2, 1])])
def test_fit_rejects_what_cannot_be_fitted(p, sizes, times):
    with pytest.raises(ValueError):
        fit_ring_link(p, sizes, times)


def test_bad_links_and_sizes_are_errors():
    with pytest.raises(ValueError, match="bandwidth"):
        LinkCost(1e-6, 0.0, source="x")
    with pytest.raises(ValueError, match="latency"):
        LinkCost(-1.0, 1.0)
    with pytest.raises(ValueError):
        ring_allreduce_time(0, 1.0, LinkCost(0, 1))
    with pytest.raises(ValueError):
        ring_allreduce_time(2, -1.0, LinkCost(0, 1))


SUMMIT_INTRA = LinkCost(5e-6, 50e9)
SUMMIT_INTER = LinkCost(10e-6, 25e9)


def test_nodes_use_intra_link_on_one_node_and_network_beyond():
    one = allreduce_time_on_nodes(1, 6, 1e8, intra=SUMMIT_INTRA, inter=SUMMIT_INTER)
    assert one == pytest.approx(2 * 5 * 5e-6 + 2 * 5 / 6 * 1e8 / 50e9)
    two = allreduce_time_on_nodes(2, 6, 1e8, intra=SUMMIT_INTRA, inter=SUMMIT_INTER)
    assert two == pytest.approx(2 * 11 * 10e-6 + 2 * 11 / 12 * 1e8 / 25e9)


def test_projection_hand_values_summit_256_nodes():
    # t1 = 0.5 s measured on one node (6 GPUs), N = 1e8 B of gradients
    # allreduce(1 node)  = 2*5*5e-6  + 2*5/6 * 1e8/5e10        = 0.00338333...
    # allreduce(256 n.)  = 2*1535*1e-5 + 2*1535/1536 * 1e8/2.5e10 = 0.0307 + 0.00799479...
    comm_1 = 5e-5 + 10 / 6 * 0.002
    comm_n = 0.0307 + 2 * 1535 / 1536 * 0.004
    step = project_step_time(0.5, 256, 6, 1e8, intra=SUMMIT_INTRA, inter=SUMMIT_INTER)
    assert step == pytest.approx(0.5 - comm_1 + comm_n, rel=1e-12)
    assert step == pytest.approx(0.5353115, rel=1e-6)


def test_projection_single_node_is_the_measurement_and_accumulation_amortizes():
    assert project_step_time(0.5, 1, 6, 1e8, intra=SUMMIT_INTRA, inter=SUMMIT_INTER) == pytest.approx(0.5)
    one = project_step_time(0.5, 256, 6, 1e8, intra=SUMMIT_INTRA, inter=SUMMIT_INTER)
    four = project_step_time(0.5, 256, 6, 1e8, intra=SUMMIT_INTRA, inter=SUMMIT_INTER, accumulate=4)
    comm_n = one - (0.5 - (5e-5 + 10 / 6 * 0.002))
    assert four == pytest.approx(4 * (one - comm_n) + comm_n)


def test_bigger_models_scale_worse():
    # the paper's point: I3D3x3x3 has ~1.9x TSM's parameters, hence lower scalability at equal step time
    # scalability: the single-node step time over the projected one (what projection.py and collect.py report)
    tsm = 0.5 / project_step_time(0.5, 64, 6, 24.3e6 * 4, intra=SUMMIT_INTRA, inter=SUMMIT_INTER)
    i3d = 0.5 / project_step_time(0.5, 64, 6, 1.9 * 24.3e6 * 4, intra=SUMMIT_INTRA, inter=SUMMIT_INTER)
    assert 0 < i3d < tsm < 1
    assert not math.isclose(i3d, tsm)


def test_fit_shrugs_off_one_disturbed_timing():
    # latency from the small messages, bandwidth from the large ones; one timing 10x too slow in each half
    link = LinkCost(3e-6, 1e9)
    sizes = [4096 * 4 ** i for i in range(8)]
    times = [ring_allreduce_time(2, n, link) for n in sizes]
    times[1] *= 10
    times[6] *= 10
    fitted = fit_ring_link(2, sizes, times)
    assert fitted.alpha_s == pytest.approx(3e-6, rel=0.05)
    assert fitted.bandwidth_bytes_per_s == pytest.approx(1e9, rel=0.05)


def test_calibration_term_is_what_the_measurement_took_beyond_the_model():
    link = LinkCost(1e-4, 1e9)
    # 2 one-GPU nodes: model = 0.5 + 2·1e-4 + 1e8/1e9 = 0.6002 s; measured 0.65 s -> 0.0498 s unmodelled
    overhead = unmodelled_overhead(0.5, 0.65, 2, 1, 1e8, intra=link, inter=link)
    assert overhead == pytest.approx(0.0498)
    # calibrated at 2 nodes: reproduces the measurement there, and carries the term to 8 nodes
    assert project_step_time(0.5, 2, 1, 1e8, intra=link, inter=link, overhead_s=overhead) == pytest.approx(0.65)
    eight = 0.5 + 14 * 1e-4 + 2 * 7 / 8 * 0.1 + 0.0498
    assert project_step_time(0.5, 8, 1, 1e8, intra=link, inter=link, overhead_s=overhead) == pytest.approx(eight)
    # one node is the measurement itself, never calibrated
    assert project_step_time(0.5, 1, 1, 1e8, intra=link, inter=link, overhead_s=overhead) == pytest.approx(0.5)


def test_the_trainers_small_allreduce_is_a_latency_tree():
    link = LinkCost(1e-5, 1e9)
    assert small_allreduce_time(1, link) == 0.0
    assert small_allreduce_time(2, link) == pytest.approx(2e-5)        # 2·1·α
    assert small_allreduce_time(1536, link) == pytest.approx(22e-5)   # 2·ceil(log2 1536)=11·α
    with_small = project_step_time(0.5, 2, 1, 1e8, intra=link, inter=link, small_collectives=1)
    assert with_small == pytest.approx(project_step_time(0.5, 2, 1, 1e8, intra=link, inter=link) + 2e-5)
