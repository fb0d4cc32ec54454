"""The draft head: its paged serving pass equals its dense training pass; it saves and loads; train-draft
runs end to end on self-generated text, checkpoints, and resumes."""

import json
import os

import pytest
import torch

import slimserve.engine.speculative.train as train_module
from slimserve.config import ModelConfig
from slimserve.engine.speculative.eagle_head import EagleHead
from slimserve.engine.speculative.train import TrainDraftConfig, train_draft_head
from slimserve.errors import CheckpointError, ModelNotFoundError, SlimserveError
from slimserve.layers.attention import AttentionMetadata
from tests.tiny_models import build_tiny_model


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_paged_pass_equals_dense_pass(tmp_path, family):
    cfg = ModelConfig.from_folder(build_tiny_model(family, str(tmp_path / family)))
    torch.manual_seed(0)
    head = EagleHead(cfg)
    for p in head.parameters():
        p.data.normal_(0, 0.1)
    lengths, block_size = [5, 9], 4
    embeds = [torch.randn(n, cfg.hidden_size) for n in lengths]
    feats = [torch.randn(n, cfg.hidden_size) for n in lengths]
    dense = [head.forward_dense(e[None], f[None])[0] for e, f in zip(embeds, feats)]
    attn = head.layer.self_attn.attn
    attn.k_cache = torch.zeros(8, block_size, cfg.num_key_value_heads, cfg.head_dim)
    attn.v_cache = torch.zeros_like(attn.k_cache)
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]).int()
    slots = torch.cat([tables[i, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
                       for i, n in enumerate(lengths)]).int()  # fmt: skip
    meta = AttentionMetadata(slots, torch.tensor([0, 5, 14], dtype=torch.int32), torch.tensor(lengths).int(), tables, 9)
    paged = head(torch.cat(embeds), torch.cat(feats), positions, meta)
    assert torch.allclose(paged, torch.cat(dense), atol=1e-5)


def test_save_load_roundtrip_and_errors(head_folder, target_folder, tmp_path):
    cfg = ModelConfig.from_folder(target_folder)
    head = EagleHead.load(head_folder, cfg, torch.device("cpu"), torch.float32)
    again = EagleHead.load(head_folder, cfg, torch.device("cpu"), torch.bfloat16)
    assert again.fc.weight.dtype == torch.bfloat16
    assert again.layer.self_attn.rotary.cos_sin_cache.dtype == torch.float32
    assert torch.equal(head.fc.weight.bfloat16(), again.fc.weight)
    with pytest.raises(ModelNotFoundError):
        EagleHead.load(str(tmp_path), cfg, torch.device("cpu"), torch.float32)
    other = ModelConfig.from_dict(dict(cfg.raw, hidden_size=cfg.hidden_size * 2))
    with pytest.raises(CheckpointError, match="hidden size"):
        EagleHead.load(head_folder, other, torch.device("cpu"), torch.float32)


def test_train_draft_checkpoints_and_resumes(target_folder, tmp_path, monkeypatch):
    out = str(tmp_path / "head")
    config = TrainDraftConfig(
        model=target_folder, out=out, num_samples=6, seq_len=24, epochs=2, batch_size=2, checkpoint_every=2,
        device="cpu",
    )  # fmt: skip
    real_loss, calls = train_module._loss, []

    def failing_loss(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train_module, "_loss", failing_loss)
    with pytest.raises(KeyboardInterrupt):
        train_draft_head(config)
    assert not os.path.exists(out)
    assert torch.load(os.path.join(out + ".work", "checkpoint.pt"))["step"] == 2
    monkeypatch.setattr(train_module, "_loss", real_loss)
    with pytest.raises(SlimserveError, match="already exists"):
        train_draft_head(TrainDraftConfig(model=target_folder, out=str(tmp_path)))
    resumed = []
    monkeypatch.setattr(train_module, "_loss", lambda *a: resumed.append(1) or real_loss(*a))
    config.resume = True
    train_draft_head(config)
    assert len(resumed) == 6 - 2  # 3 steps per epoch, 2 epochs, 2 done before the interruption
    assert not os.path.exists(out + ".work")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["EagleDraftHead"]
    EagleHead.load(out, ModelConfig.from_folder(target_folder), torch.device("cpu"), torch.float32)
