"""Presets reproduce their published figures; the textbook model is exact."""

from __future__ import annotations

import pytest

from moelab.accounting.params import count_params
from moelab.accounting.published import PRESETS, get_preset
from moelab.errors import ConfigError


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_matches_published_figures(name):
    preset = PRESETS[name]
    counts = count_params(preset.build())
    # published_extra: parameters the published total includes but the sized
    # text model does not (Llama 4's vision encoder + projector).
    total = counts.total + preset.published_extra
    active = preset.published_active_of(counts.active, counts.embedding)
    if preset.published_unit is None:
        assert abs(total / preset.published_total - 1) < 0.005
        assert abs(active / preset.published_active - 1) < 0.02
    else:  # within one unit of the quoted figure
        unit_total, unit_active = preset.published_unit
        assert abs(total - preset.published_total) < unit_total
        assert abs(active - preset.published_active) < unit_active


def test_textbook_8x7b_exact():
    counts = count_params(get_preset("textbook-8x7b").build())
    assert counts.total == 63_000_000_000
    assert counts.active == 21_000_000_000
    (group,) = counts.moe_groups
    assert (group.num_experts, group.top_k, group.skipped) == (8, 2, 6)
    assert group.ffn_compute_saved == 0.75


def test_deepseek_v3_structure():
    spec = get_preset("deepseek-v3").build()
    kinds = [type(layer.ffn).__name__ for layer in spec.layers]
    assert kinds[:3] == ["MLPSpec"] * 3 and set(kinds[3:]) == {"MoESpec"}
    assert spec.layers[0].attention.kind == "mla"
    (group,) = count_params(spec).moe_groups
    assert (group.num_experts, group.top_k, group.num_shared, len(group.layers)) == (256, 8, 1, 58)


def test_llama4_maverick_interleaves_moe_layers():
    (group,) = count_params(get_preset("llama-4-maverick").build()).moe_groups
    assert group.layers == tuple(range(1, 48, 2))


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="mixtral-8x7b"):
        get_preset("mixtral-9x9b")


def test_gpt_oss_published_active_excludes_the_embedding_table():
    """gpt-oss-120b's 5.1B active leaves out the input embedding (not the LM head):
    with it, the count is 5.7B, which the model card does not quote."""
    preset = get_preset("gpt-oss-120b")
    counts = count_params(preset.build())
    assert abs(counts.active - 5.71e9) < 0.01e9
    assert abs(preset.published_active_of(counts.active, counts.embedding) - 5.13e9) < 0.01e9
