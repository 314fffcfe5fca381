"""The schedule simulator (``pipellm.plan.schedules``) against schedules worked by hand, and its command line."""
from __future__ import annotations

import dataclasses

import pytest

from pipellm.plan.__main__ import main as plan_main
from pipellm.plan.profile import profile_layers
from pipellm.plan.schedules import PassCosts, simulate

UNIT = PassCosts(1, 1, 1)


def test_two_stages_four_micro_batches_unit_costs():
    one = simulate("1f1b", [UNIT] * 2, 4)
    assert [[f"{k}{j}" for k, j in order] for order in one.orders] == [
            ["F0", "F1", "BW0", "F2", "BW1", "F3", "BW2", "BW3"], ["F0", "BW0", "F1", "BW1", "F2", "BW2", "F3", "BW3"]]
    # 1F1B: (m + P - 1)(F + B + W) = 5 x 3; each stage waits (P - 1)(F + B + W) = 3 of it.
    assert one.step_time == 15 and one.busy == [12, 12] and one.bubble == pytest.approx(3 / 15)
    assert one.starts[0] == [0, 1, 4, 6, 7, 9, 10, 13] and one.starts[1] == [1, 2, 4, 5, 7, 8, 10, 11]
    zb = simulate("zb-h1", [UNIT] * 2, 4)
    assert [[f"{k}{j}" for k, j in order] for order in zb.orders] == [
        ["F0", "F1", "B0", "W0", "F2", "B1", "W1", "F3", "B2", "W2", "B3", "W3"],
        ["F0", "B0", "F1", "B1", "W0", "F2", "B2", "W1", "F3", "B3", "W2", "W3"]]
    # ZB-H1: the bubble shrinks to (P - 1)(F + B - W) = 1.
    assert zb.step_time == 13 and zb.bubble == pytest.approx(1 / 13)
    assert zb.starts[0] == [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert zb.starts[1] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    # Micro batches held (forward done, W not yet): 1F1B P - s; ZB-H1 P on every stage, stage 0's 1F1B peak.
    assert one.peak_held() == [2, 1] and zb.peak_held() == [2, 2]


def test_uneven_pass_costs_by_hand():
    # F = 2, B = 2, W = 1 on 2 stages, 2 micro batches (worked by hand: 1F1B stage 0 waits for BW0 until 7,
    # for BW1 until 12; ZB-H1's stage 1 defers W0 behind B1, so stage 0 gets B1's gradient at 10).
    costs = [PassCosts(2, 2, 1)] * 2
    one, zb = simulate("1f1b", costs, 2), simulate("zb-h1", costs, 2)
    assert one.starts == [[0, 2, 7, 12], [2, 4, 7, 9]] and one.step_time == 15  # bubble (P-1)(F+B+W) = 5
    assert zb.starts == [[0, 2, 6, 8, 10, 12], [2, 4, 6, 8, 10, 11]] and zb.step_time == 13  # (P-1)(F+B-W) = 3


def test_transfers_delay_both_directions():
    # 1F1B, 2 stages, 4 micro batches, 0.5 per transfer (by hand): every backward of stage 0 waits a round trip.
    one = simulate("1f1b", [UNIT] * 2, 4, p2p=0.5)
    assert one.starts[0] == [0, 1, 5, 7, 8, 10, 12, 15] and one.step_time == 17
    assert simulate("zb-h1", [UNIT] * 2, 4, p2p=0.5).step_time < one.step_time


@pytest.mark.parametrize("stages, micro_batches", [(3, 6), (4, 8), (4, 16), (8, 32)])
def test_equal_unit_stages_follow_the_closed_forms(stages, micro_batches):
    one = simulate("1f1b", [UNIT] * stages, micro_batches)
    zb = simulate("zb-h1", [UNIT] * stages, micro_batches)
    assert one.step_time == (micro_batches + stages - 1) * 3
    assert one.bubble == pytest.approx((stages - 1) / (micro_batches + stages - 1))
    assert zb.step_time == 3 * micro_batches + (stages - 1)  # a third of 1F1B's bubble
    assert one.peak_held() == list(range(stages, 0, -1)) and zb.peak_held() == [stages] * stages


def test_command_line_prints_table_and_order(capsys):
    plan_main(["--schedule", "zb-h1", "--stage-costs", "1,1,1", "--num-stages", "2", "--micro-batches", "4"])
    out = capsys.readouterr().out
    assert "1f1b      15              20.0%   1.250" in out and "zb-h1     13              7.7%    1.083" in out
    assert "  stage 0: F0 F1 B0 W0 F2 B1 W1 F3 B2 W2 B3 W3" in out
    with pytest.raises(SystemExit) as exit_info:
        plan_main(["--stage-costs", "1,1", "--micro-batches", "4"])
    assert exit_info.value.code == 2 and "give F,B,W milliseconds per stage" in capsys.readouterr().err


def test_plan_feeds_measured_pass_costs_to_the_simulator(tmp_path, capsys, monkeypatch):
    import yaml

    import pipellm.plan
    import pipellm.plan.profile
    from conftest import REPO

    profiles = []

    def recorded(*args, **kwargs):
        profiles.append(profile_layers(*args, **kwargs))
        return profiles[-1]

    monkeypatch.setattr(pipellm.plan, "profile_layers", recorded)
    monkeypatch.setattr(pipellm.plan.profile, "WARMUP_STEPS", 1)  # the figures are not under test: fewer passes
    monkeypatch.setattr(pipellm.plan.profile, "TIMED_STEPS", 1)
    config = {"model_path": str(REPO / "pipellm" / "assets" / "tiny_llama"), "save_path": str(tmp_path / "save"),
              "data_path": str(tmp_path / "none.jsonl"), "from_scratch": True, "max_seq_len": 16,
              "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 3]},
              "train_batch_size": 4, "train_micro_batch_size_per_gpu": 1}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    plan_main(["--config", str(tmp_path / "c.yml"), "--schedule", "zb-h1"])
    out = capsys.readouterr().out
    profile, = profiles
    for cost in (profile.embed, profile.decoder, profile.head):
        # W is the rest of the measured backward, never below 0 (timing noise can leave nothing to split).
        forward, input_grad, weight_grad = dataclasses.astuple(cost.passes)
        assert forward > 0 and input_grad >= 0 and weight_grad >= 0
        if weight_grad > 0:
            assert forward + input_grad + weight_grad == pytest.approx(cost.seconds, rel=1e-9)
        else:
            assert forward + input_grad >= cost.seconds * (1 - 1e-9)
    assert profile.embed.passes.input_grad == 0  # token ids have no gradient: the embedding's backward is W
    stages = [profile.stage_passes(0, 3), profile.stage_passes(3, 6)]  # parts [3, 3]
    printed = ", ".join(f"{c.forward * 1e3:.4g}/{c.input_grad * 1e3:.4g}/{c.weight_grad * 1e3:.4g}" for c in stages)
    assert f"pipellm schedule: 2 stages, 4 micro batches, p2p 0 ms; per stage F/B/W ms: {printed}" in out
    assert "  stage 1: F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3" in out


def test_compiled_layers_take_their_passes_from_the_layers_as_zb_h1_builds_them():
    from pipellm.pipeline.partition import PipelineLayers
    from pipellm.plan.profile import LayerCost, Profile

    def cost(seconds, passes):
        return LayerCost(seconds, 0, 0, 0, 0, PassCosts(*passes))

    compiled = Profile("test", cost(1.0, (0.25, 0, 0.75)), cost(6.0, (2.0, 4.0, 0)), cost(3.0, (1.0, 2.0, 0)),
                       PipelineLayers(num_decoders=2, tied=False), 0)
    separated = Profile("test", cost(1.5, (0.5, 0, 1.0)), cost(6.5, (2.0, 2.5, 2.0)), cost(3.5, (1.0, 1.0, 1.5)),
                        PipelineLayers(num_decoders=2, tied=False), 0)
    both = compiled.with_passes_of(separated)
    assert [c.seconds for c in (both.embed, both.decoder, both.head)] == [1.0, 6.0, 3.0]  # 1F1B's build
    assert both.decoder.passes == PassCosts(2.0, 2.5, 2.0) and both.head.passes == PassCosts(1.0, 1.0, 1.5)
    assert both.stage_passes(0, 2) == PassCosts(2.5, 2.5, 3.0)  # embedding + first decoder
