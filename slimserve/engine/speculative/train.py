"""`slimserve train-draft`: train an EAGLE-style draft head by distillation on text the target writes itself.

1. The target samples continuations of short, varied prompts (its own distribution: no data set needed).
2. One target pass per sequence gives its final hidden states f_t (the features the engine exposes).
3. The head learns, at each position t, to map (f_t, x_{t+1}) to f_{t+1}: a soft cross-entropy between the
   target's next-token distribution lm_head(f_{t+1}) and the head's lm_head(f_hat), plus a feature
   regression term.
Progress is checkpointed in OUT.work/ (data and optimizer state), so --resume continues where it stopped;
the finished head is written to OUT in one rename.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from slimserve.compress.selfgen import PROMPTS
from slimserve.config import SamplingParams, parse_dtype
from slimserve.engine.runner import ModelRunner
from slimserve.engine.speculative.eagle_head import EagleHead
from slimserve.errors import SlimserveError
from slimserve.layers.attention import AttentionMetadata

CHAT_QUESTIONS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a hash map works.",
    "What should I pack for a week in the mountains?",
    "Summarize the causes of the French Revolution.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Give me three tips for writing a good cover letter.",
    "Describe the water cycle to a ten-year-old.",
    "Write a polite letter declining an invitation to dinner.",
)


@dataclass
class TrainDraftConfig:
    model: str
    out: str
    num_samples: int = 256
    seq_len: int = 256
    temperature: float = 0.7
    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-3
    regression_weight: float = 0.1
    checkpoint_every: int = 50
    resume: bool = False
    seed: int = 0
    device: str | None = None
    save_dtype: str = "float32"
    # On a GPU the target's KV cache (for generating the data) leaves the rest to training.
    gpu_memory_utilization: float = 0.5

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.seq_len < 8 or self.epochs < 1 or self.batch_size < 1:
            raise SlimserveError("num_samples, epochs and batch_size must be positive and seq_len at least 8")
        if self.lr <= 0 or self.checkpoint_every < 1:
            raise SlimserveError("lr and checkpoint_every must be positive")


def _prompts(llm, count: int) -> list[list[int]]:
    """Plain-text openings and, when the model has a chat template, chat questions; cycled to `count`."""
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    if tokenizer.chat_template:
        prompts += [llm.apply_chat_template([{"role": "user", "content": q}]) for q in CHAT_QUESTIONS]
    # A tokenizer that maps an opening to nothing starts from its first special token instead.
    fallback = [next(t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, 0) if t is not None)]
    return [prompts[i % len(prompts)] or fallback for i in range(count)]


def self_generate(llm, config: TrainDraftConfig) -> list[list[int]]:
    """num_samples sequences (prompt + sampled continuation, each with its own seed) of up to seq_len tokens."""
    prompts = [p[: config.seq_len // 2] for p in _prompts(llm, config.num_samples)]
    params = [
        SamplingParams(temperature=config.temperature, max_tokens=config.seq_len - len(p), seed=config.seed + i)
        for i, p in enumerate(prompts)
    ]
    outputs = llm.generate(prompts, params)
    return [p + o.outputs[0].token_ids for p, o in zip(prompts, outputs)]


@torch.inference_mode()
def target_features(runner: ModelRunner, token_ids: list[int]) -> torch.Tensor:
    """The target's final hidden states [T, H] of one sequence, computed in the engine's (idle) KV cache."""
    n = len(token_ids)
    blocks = -(-n // runner.block_size)
    if blocks > runner.num_blocks:
        raise SlimserveError(f"a sequence of {n} tokens does not fit the KV cache; lower --seq-len")
    dev = runner.device
    positions = torch.arange(n, dtype=torch.int32, device=dev)
    meta = AttentionMetadata(
        slot_mapping=positions,
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
        max_seqlen_q=n,
    )
    ids = torch.tensor(token_ids, dtype=torch.int32, device=dev)
    return runner.model(ids, positions, meta).float().cpu()


def _batches(num: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    order = list(range(num))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, num, batch_size)]


def _loss(head: EagleHead, model, tokens: list[list[int]], features: list[torch.Tensor], reg_weight: float):
    """Loss and top-1 agreement of a batch of sequences (padded on the right, padding masked)."""
    dev = next(head.parameters()).device
    length = max(len(t) for t in tokens) - 1
    batch = len(tokens)
    hidden = features[0].shape[1]
    ids = torch.zeros(batch, length, dtype=torch.long)
    feats = torch.zeros(batch, length + 1, hidden)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b, (t, f) in enumerate(zip(tokens, features)):
        n = len(t) - 1
        ids[b, :n] = torch.tensor(t[1:])
        feats[b, : n + 1] = f
        mask[b, :n] = True
    ids, feats, mask = ids.to(dev), feats.to(dev), mask.to(dev)
    embeds = F.embedding(ids, model.embed_tokens)
    predicted = head.forward_dense(embeds, feats[:, :-1])
    target_feats = feats[:, 1:]
    with torch.no_grad():
        teacher = model.compute_logits(target_feats[mask]).float().softmax(dim=-1)
    student = model.compute_logits(predicted[mask]).float().log_softmax(dim=-1)
    ce = -(teacher * student).sum(dim=-1).mean()
    reg = F.smooth_l1_loss(predicted[mask], target_feats[mask])
    agree = (student.argmax(dim=-1) == teacher.argmax(dim=-1)).float().mean()
    return ce + reg_weight * reg, agree


def _save_atomic(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_draft_head(config: TrainDraftConfig) -> str:
    from slimserve import LLM

    if os.path.exists(config.out) and not config.resume:
        raise SlimserveError(f"{config.out} already exists; choose another --out")
    work = config.out.rstrip("/") + ".work"
    data_path, ckpt_path = os.path.join(work, "data.pt"), os.path.join(work, "checkpoint.pt")
    if config.resume and not os.path.isfile(data_path):
        raise SlimserveError(f"nothing to resume: {data_path} does not exist")
    os.makedirs(work, exist_ok=True)
    torch.manual_seed(config.seed)
    save_dtype = parse_dtype(config.save_dtype, torch.device("cpu"))
    llm = LLM(
        config.model,
        dtype="float32",
        device=config.device,
        max_model_len=config.seq_len + 16,
        seed=config.seed,
        gpu_memory_utilization=config.gpu_memory_utilization,
    )
    runner = llm.engine.runner
    model = runner.model
    if config.resume:
        data = torch.load(data_path)
    else:
        tokens = [t for t in self_generate(llm, config) if len(t) > 2]
        feats = [target_features(runner, t) for t in tqdm(tokens, desc="target features", unit="seq")]
        data = {"tokens": tokens, "features": feats}
        _save_atomic(data, data_path)
    head = EagleHead(llm.engine.model_config).to(runner.device)
    head.init_from_target(model, config.seed)
    for param in head.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data["tokens"]) / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    step = 0
    if config.resume and os.path.isfile(ckpt_path):
        ckpt = torch.load(ckpt_path)
        head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        step = ckpt["step"]
    head.train()
    with tqdm(total=total, initial=step, desc="training draft head", unit="step") as bar:
        while step < total:
            epoch, index = divmod(step, steps_per_epoch)
            batch = _batches(len(data["tokens"]), config.batch_size, epoch, config.seed)[index]
            loss, agree = _loss(
                head,
                model,
                [data["tokens"][i] for i in batch],
                [data["features"][i] for i in batch],
                config.regression_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{agree.item():.3f}", epoch=epoch)
            if step % config.checkpoint_every == 0 or step == total:
                state = {"head": head.state_dict(), "optimizer": optimizer.state_dict()}
                _save_atomic(state | {"schedule": schedule.state_dict(), "step": step}, ckpt_path)
    head.eval()
    head.save(config.out, str(config.model), save_dtype)
    shutil.rmtree(work, ignore_errors=True)
    return config.out
