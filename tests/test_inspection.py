"""lora/inspection.py and inspect_lora.py on tiny models with known updates."""
import torch
from torch import nn

from conftest import LABELS
from lora.cli.inspect_lora import main
from lora import LoRALinear, inject_lora, save_adapter
from lora.backbone import load_classifier_model
from lora.inspection import adapter_stats, merge_gap, update_stats
from lora.data import pad_batch


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
    assert abs(stats.top_share - (s[0] ** 2 / (s ** 2).sum()).item()) < 1e-5
    projected = (u[:, :4].T @ weight @ vh[:4].T).norm().item()
    assert abs(stats.amplification - delta.norm().item() / projected) < 1e-4
    assert stats.effective_rank == 4


def test_a_rank_one_update_has_effective_rank_one_and_all_its_energy_on_top():
    stats = update_stats("v", layer_with_update(rank_of_b=1))
    assert stats.effective_rank == 1 and abs(stats.top_share - 1.0) < 1e-5


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
        f"roberta.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]


def test_the_command_prints_every_layer_and_draws_the_plot(tiny_model_dir, tmp_path, capsys):
    model = load_classifier_model(str(tiny_model_dir), LABELS)
    inject_lora(model, r=4, alpha=8.0)
    save_adapter(tmp_path, model, {"base_model": str(tiny_model_dir), "labels": LABELS,
                                   "max_length": 32, "clean": False})
    main(["--adapter", str(tmp_path), "--plot", str(tmp_path / "plot.png")])
    out = capsys.readouterr().out
    assert "total" in out and out.count("attention.self.") >= 8  # parameter table + stats rows
    assert "largest difference 0.00e+00" in out  # B = 0: merging changes nothing at all
    assert (tmp_path / "plot.png").stat().st_size > 10_000
