"""The model card's editing section is written from the method benchmark's rows (inversion x editor)."""

from __future__ import annotations

import json

from pipeline.world.model_card import write_model_card


def _record(null_text_recon: float) -> dict:
    rows = [{"inversion": "vae", "editor": None, "recon_psnr_db": 31.0}]
    for editor in ("P2P", "none"):
        rows.append({"inversion": "null_text", "editor": editor, "recon_psnr_db": null_text_recon})
        rows.append({"inversion": "direct", "editor": editor, "recon_psnr_db": 31.0, "edit_success": 0.75})
    return {
        "vae_psnr_db_heldout": 31.0,
        "oracle_agreement_heldout_captions": {"shape": 0.95, "color": 1.0},
        "editing": {"setup": "two scenes", "vae_psnr_db": 31.0, "rows": rows, "skipped": []},
    }


def test_the_card_lists_every_inversion_x_editor_row_and_checks_null_text_against_the_vae(tmp_path):
    (tmp_path / "benchmark_metrics.json").write_text(json.dumps(_record(null_text_recon=28.5)))

    card = write_model_card(tmp_path).read_text()

    for inversion in ("null_text", "direct"):
        for editor in ("P2P", "none"):
            assert f"| {inversion} | {editor} |" in card
    assert "| direct | none | 31 | - | 0.75 |" in card
    assert "| vae | None |" not in card  # the ceiling is its own line, not an editor row
    assert "null-text reconstruction 28.5 dB is more than 2 dB below the VAE's 31.0 dB" in card

    (tmp_path / "benchmark_metrics.json").write_text(json.dumps(_record(null_text_recon=30.0)))
    assert "Targets met" in write_model_card(tmp_path).read_text()
