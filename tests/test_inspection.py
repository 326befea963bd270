"""lora/inspection.py and inspect_lora.py on tiny models with known updates."""

import json
import math

import pytest
import torch
from torch import nn

from helpers import LABELS, producer_config, refused
from lora import DoRALinear, LoRALinear, inject_lora, save_adapter
from lora.classifier import load_classifier_model
from lora.cli.inspect_lora import main, strict_json
from lora.data import pad_batch
from lora.inspection import (
    adapter_stats,
    applied_weight,
    compare_adapters,
    direction_projections,
    energy_rank,
    entropy_rank,
    magnitude_direction_change,
    merge_gap,
    random_similarity,
    subspace_similarity,
    trend_slope,
    update_stats,
)


def layer_with_update(rank_of_b: int) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10), r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.zero_()
        layer.lora_B[:, :rank_of_b].normal_()
    return layer


def test_update_stats_match_their_definitions():
    layer = layer_with_update(rank_of_b=4)
    stats = update_stats("q", layer)
    weight, delta = layer.base.weight, 2.0 * layer.lora_B @ layer.lora_A
    u, s, vh = torch.linalg.svd(delta.detach())
    assert stats.r == 4 and len(stats.singular_values) == 4
    torch.testing.assert_close(torch.tensor(stats.singular_values), s[:4])
    assert abs(stats.update_norm - delta.norm().item()) < 1e-5
    assert abs(stats.relative_update - delta.norm().item() / weight.norm().item()) < 1e-6
    assert abs(stats.top_share - (s[0] ** 2 / (s**2).sum()).item()) < 1e-5
    projected = (u[:, :4].T @ weight @ vh[:4].T).norm().item()
    assert abs(stats.amplification - delta.norm().item() / projected) < 1e-4
    energy = (s[:4] ** 2).cumsum(0) / (s[:4] ** 2).sum()
    assert stats.energy_rank == next(k + 1 for k in range(4) if energy[k] >= 0.9)
    p = s[:4] / s[:4].sum()
    assert stats.entropy_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)


def test_a_rank_one_update_has_effective_rank_one_and_all_its_energy_on_top():
    stats = update_stats("v", layer_with_update(rank_of_b=1))
    # float32 SVD leaves the three zero singular values at ~1e-7, not 0: hence the tolerance.
    assert stats.energy_rank == 1 and abs(stats.entropy_rank - 1.0) < 1e-4 and abs(stats.top_share - 1.0) < 1e-5


def test_effective_ranks_on_known_singular_values():
    assert energy_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 4  # 3 of 4 hold 75% < 90%
    assert energy_rank(torch.tensor([3.0, 1.0, 0.0])) == 1  # 9 / 10 reaches 90% exactly
    assert energy_rank(torch.tensor([3.0, 1.1, 0.0])) == 2
    assert energy_rank(torch.zeros(3)) == 0 and entropy_rank(torch.zeros(3)) == 0.0
    assert entropy_rank(torch.tensor([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0, rel=1e-12)
    assert entropy_rank(torch.tensor([3.0, 1.0])) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-12
    )  # 1.7548


def rank_one_dominated_layer(r: int = 8, tail: float = 0.05) -> LoRALinear:
    """A layer whose update has singular values exactly (1, tail, ..., tail): A's rows and B's
    columns orthonormal, B scaled by the singular values over the layer's scaling."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(48, 40), r=r, alpha=2.0 * r)
    values = torch.tensor([1.0] + [tail] * (r - 1))
    with torch.no_grad():
        layer.lora_A.copy_(torch.linalg.qr(torch.randn(48, r))[0].T)
        layer.lora_B.copy_(torch.linalg.qr(torch.randn(40, r))[0] * values / layer.scaling)
    return layer


def test_a_rank_one_dominated_adapter_reads_effective_rank_one():
    """The issue's case: a first singular value holding 98% of the energy and 7 small ones
    above 1% of it. A threshold count read 8 of 8; where the energy is says 1."""
    stats = update_stats("q", rank_one_dominated_layer())
    torch.testing.assert_close(
        torch.tensor(stats.singular_values), torch.tensor([1.0] + [0.05] * 7), rtol=0, atol=1e-5
    )  # float32 SVD of a constructed matrix
    assert stats.top_share == pytest.approx(1 / 1.0175, rel=1e-4)
    assert sum(v > 0.01 * stats.singular_values[0] for v in stats.singular_values) == 8
    assert stats.energy_rank == 1
    p = torch.tensor([1.0] + [0.05] * 7, dtype=torch.float64) / 1.35
    assert stats.entropy_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-4)  # 1.96


def test_subspace_similarity_on_known_subspaces():
    eye = torch.eye(6)
    first = torch.stack([2 * eye[0], eye[1]])  # top directions e1, e2
    second = torch.stack([2 * eye[0], eye[2], 0.5 * eye[1]])  # e1, e3, e2
    phi = subspace_similarity(first, second)
    torch.testing.assert_close(phi, torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.5, 1.0]]))
    same_rows = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) @ torch.randn(5, 20)
    mixed = torch.randn(3, 3) @ same_rows  # the same row space, other singular vectors
    assert subspace_similarity(same_rows, mixed)[2, 2] == pytest.approx(1.0, abs=1e-6)


def test_subspace_similarity_of_random_subspaces_is_near_its_expectation():
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            subspace_similarity(torch.randn(4, 64, generator=generator), torch.randn(8, 64, generator=generator))
            for _ in range(1000)
        ]
    )
    mean = draws.mean(0)
    # 1000 seeded draws: the mean is within 10% of max(i, j) / d at (1, 1), (4, 4) and (4, 8).
    for i, j in [(1, 1), (4, 4), (4, 8)]:
        assert mean[i - 1, j - 1] == pytest.approx(random_similarity(i, j, 64), rel=0.1)


def test_direction_projections_on_a_known_weight():
    weight = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.0, 0.0, 0.0]))
    delta = 3.0 * torch.outer(torch.eye(6)[2], torch.eye(6)[2])  # boosts W's weakest used direction
    result = direction_projections(weight, delta, r=1, generator=torch.Generator().manual_seed(0))
    assert (result.weight_norm, result.update_norm) == pytest.approx((math.sqrt(126), 3.0))
    assert (result.onto_update, result.onto_weight) == pytest.approx((1.0, 10.0))
    assert result.amplification == pytest.approx(3.0)
    assert 0 < result.onto_random < result.onto_weight  # the top frame captures the most (Ky Fan)


def test_magnitude_and_direction_change_separate_length_from_angle():
    initial = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert magnitude_direction_change(initial, 2 * initial) == pytest.approx((3.0, 0.0))  # (5 + 1) / 2
    rotated = torch.tensor([[-4.0, 3.0], [0.0, 1.0]])  # each row turned by 90 degrees
    assert magnitude_direction_change(initial, rotated) == pytest.approx((0.0, 1.0))
    assert trend_slope([0.0, 1.0, 2.0], [1.0, -1.0, -3.0]) == pytest.approx(-2.0)


def test_applied_weight_is_what_the_layer_computes():
    torch.manual_seed(0)
    for layer in (LoRALinear(nn.Linear(6, 5), r=2, alpha=4.0), DoRALinear(nn.Linear(6, 5), r=2, alpha=4.0)):
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(3, 6)
        # float32: the layer's two-step path and one matmul with the summed weight round differently.
        torch.testing.assert_close(layer(x), x @ applied_weight(layer).T + layer.base.bias, rtol=1e-5, atol=1e-6)
    plain = nn.Linear(6, 5)
    assert torch.equal(applied_weight(plain), plain.weight)


def test_compare_adapters_refuses_adapters_of_other_layers_or_widths():
    narrow, wide = nn.Sequential(nn.Linear(6, 4)), nn.Sequential(nn.Linear(8, 4))
    other = nn.Sequential(nn.Identity(), nn.Linear(6, 4))
    for model in (narrow, wide, other):
        inject_lora(model, ("0", "1"), r=2, alpha=4, trainable_modules=())
    with pytest.raises(ValueError, match="input width 6 vs 8"):
        compare_adapters(narrow, wide)
    with pytest.raises(ValueError, match="no LoRA layer in common"):
        compare_adapters(narrow, other)


def test_stats_of_a_merged_layer_use_the_pretrained_weight():
    layer = layer_with_update(rank_of_b=2)
    before = update_stats("q", layer)
    layer.eval()
    layer.merge()
    assert update_stats("q", layer) == before


def test_merge_gap_is_float_rounding_and_leaves_the_model_unmerged(tiny_model_dir):
    model = load_classifier_model(str(tiny_model_dir), LABELS)
    inject_lora(model, r=4, alpha=8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    inputs = pad_batch([[0, 10, 11, 2], [0, 12, 2]], pad_id=1)
    assert 0 < merge_gap(model, inputs) < 1e-5
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, LoRALinear))
    assert [s.name for s in adapter_stats(model)] == [
        f"roberta.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")
    ]


def test_the_command_prints_every_layer_and_draws_the_plot(tiny_model_dir, tmp_path, capsys):
    model = load_classifier_model(str(tiny_model_dir), LABELS)
    inject_lora(model, r=4, alpha=8.0)
    save_adapter(tmp_path, model, **producer_config(tiny_model_dir))
    main(["--adapter", str(tmp_path), "--plot", str(tmp_path / "plot.png")])
    out = capsys.readouterr().out
    assert "total" in out and out.count("attention.self.") >= 8  # parameter table + stats rows
    assert "largest difference 0.00e+00" in out  # B = 0: merging changes nothing at all
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def saved_adapter(folder, model_dir, r: int, seed: int):
    """A trained-looking adapter of rank ``r`` (seeded random B) on the tiny model, saved to ``folder``."""
    model = load_classifier_model(str(model_dir), LABELS)
    torch.manual_seed(seed)
    inject_lora(model, r=r, alpha=2.0 * r)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    save_adapter(folder, model, **producer_config(model_dir))
    return model


def test_the_command_prints_json_for_scripts(tiny_model_dir, tmp_path, capsys):
    model = saved_adapter(tmp_path, tiny_model_dir, r=4, seed=0)
    main(["--adapter", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    expected = adapter_stats(model)
    assert [layer["name"] for layer in report["layers"]] == [s.name for s in expected]
    assert report["layers"][0]["energy_rank"] == expected[0].energy_rank
    assert report["layers"][0]["entropy_rank"] == pytest.approx(expected[0].entropy_rank, rel=1e-6)
    assert report["trainable_parameters"] == 4 * 4 * (32 + 32) + 32 * 32 + 32 + 32 * 4 + 4
    assert 0 < report["merge_gap"] < 1e-5 and "compare" not in report


def test_json_of_an_untrained_adapter_reads_rank_zero(tiny_model_dir, tmp_path, capsys):
    model = load_classifier_model(str(tiny_model_dir), LABELS)
    inject_lora(model, r=2, alpha=4.0)  # B = 0: delta_W = 0
    save_adapter(tmp_path, model, **producer_config(tiny_model_dir))
    main(["--adapter", str(tmp_path), "--json"])
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert {(layer["amplification"], layer["energy_rank"], layer["entropy_rank"]) for layer in layers} == {
        (0.0, 0, 0.0)
    }


def test_json_has_null_where_a_number_is_infinite():
    # An update orthogonal to everything W uses has an infinite amplification; JSON has no inf.
    assert strict_json({"a": [float("inf"), float("nan"), 1.5], "b": 2}) == {"a": [None, None, 1.5], "b": 2}


def test_compare_prints_the_subspace_similarity_and_draws_the_heatmaps(tiny_model_dir, tmp_path, capsys):
    first, second = (
        saved_adapter(tmp_path / "r2", tiny_model_dir, r=2, seed=1),
        saved_adapter(tmp_path / "r4", tiny_model_dir, r=4, seed=2),
    )
    main(["--adapter", str(tmp_path / "r2"), "--compare", str(tmp_path / "r4"), "--json"])
    report = json.loads(capsys.readouterr().out)["compare"]
    expected = compare_adapters(first, second)
    assert len(report["layers"]) == 4 and report["layers"][0]["name"] == expected[0].name
    torch.testing.assert_close(torch.tensor(report["layers"][0]["phi"]), torch.tensor(expected[0].phi))
    assert len(report["layers"][0]["phi"]) == 2 and len(report["layers"][0]["phi"][0]) == 4
    assert (tmp_path / "r2" / "subspace_similarity.png").stat().st_size > 10_000

    main(
        [
            "--adapter",
            str(tmp_path / "r4"),
            "--compare",
            str(tmp_path / "r4"),
            "--compare-plot",
            str(tmp_path / "self.png"),
        ]
    )
    out = capsys.readouterr().out
    rows = [
        line.split() for line in out.splitlines() if line.startswith("roberta.encoder.layer.1.attention.self.value")
    ]
    # The last row is the similarity table: an adapter shares every direction with itself.
    assert rows[-1][1] == "1.000" and rows[-1][3] == "1.000" and rows[-1][2] == f"{1 / 32:.3f}"
    assert (tmp_path / "self.png").is_file()


def test_compare_plot_without_compare_is_a_usage_error(tiny_model_dir, tmp_path):
    saved_adapter(tmp_path, tiny_model_dir, r=2, seed=0)
    with refused("--compare-plot needs --compare"):
        main(["--adapter", str(tmp_path), "--compare-plot", str(tmp_path / "x.png")])
