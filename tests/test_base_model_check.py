"""A lean checkpoint holds no frozen weight: the trainer state names the base it was trained on, and a resume on a
base of another size fails, naming both (ckf_dist.worker.check_base_model)."""
import pytest
import torch

from ckf_dist.config import load_config
from ckf_dist.model.llm import build_tiny_tokenizer
from ckf_dist.worker import base_model_record, build_ckf_model, check_base_model


def _record(*args):
    cfg = load_config(["model.tiny.hidden_size=16", "model.tiny.intermediate_size=32", "model.tiny.num_layers=1",
                       "model.tiny.pretrain_steps=0", "cf.dim=4", *args])
    tok = build_tiny_tokenizer(["The user liked noir 1. Yes No 1 2 3 4 5"] * 5, 300)
    model = build_ckf_model(cfg, tok, torch.zeros(3, 4), torch.zeros(3, 4))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return base_model_record(cfg, model), frozen


def test_a_resume_on_another_base_fails_and_a_moved_base_is_logged():
    saved, frozen = _record()
    assert saved == {"source": "tiny", "path": "", "frozen_parameters": frozen}
    lines = []
    check_base_model(saved, dict(saved), lines.append)  # the same base: silent
    check_base_model(None, saved, lines.append)  # a checkpoint from before the record: nothing to compare
    assert lines == []
    wider, _ = _record("model.tiny.hidden_size=32")
    with pytest.raises(ValueError, match=f"{frozen:,} frozen parameters .*model.source=tiny.*has "
                                         f"{wider['frozen_parameters']:,}"):
        check_base_model(saved, wider, lines.append)
    check_base_model(saved, dict(saved, path="/elsewhere/base"), lines.append)
    assert len(lines) == 1 and "'/elsewhere/base'" in lines[0]
