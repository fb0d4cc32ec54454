"""Training the experiment's teacher (rectified flow on the shapes) and its feature classifier."""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from torch import nn
from tqdm import tqdm

from slimserve.diffusion.class_pipeline import ClassConditionalFlowPipeline
from slimserve.diffusion.experiments.shapes import IMAGE_SIZE, NUM_CLASSES, SHAPES, ShapesData


def new_teacher(
    layers: int = 6, heads: int = 4, head_dim: int = 16, patch_size: int = 2
) -> ClassConditionalFlowPipeline:
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=3,
        out_channels=3,
        num_layers=layers,
        sample_size=IMAGE_SIZE,
        patch_size=patch_size,
        num_embeds_ada_norm=NUM_CLASSES,  # the label table gets one more row: the null class for CFG
        norm_num_groups=1,
    )
    return ClassConditionalFlowPipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=1.0))


def train_teacher(
    pipe: ClassConditionalFlowPipeline,
    data: ShapesData,
    steps: int,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
) -> list[float]:
    """Rectified flow: x_t = (1 - t) x + t noise, the model regresses noise - x; labels drop to the null class
    10% of the time (the model's own label dropout in training mode) so CFG works."""
    model = pipe.transformer.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="teacher", mininterval=5):
        index = torch.randint(0, len(data.labels), (batch,), generator=generator)
        x, labels = data.images[index].to(device), data.labels[index].to(device)
        noise = torch.randn(x.shape, generator=generator).to(device)
        t = torch.sigmoid(torch.randn(batch, generator=generator)).to(device)  # logit-normal times, as SD3 trains
        noisy = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
        prediction = model(noisy, timestep=t * 1000, class_labels=labels).sample
        loss = ((prediction - (noise - x)) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


class ShapesClassifier(nn.Module):
    """A small CNN predicting the caption's class; its penultimate layer gives the Fréchet distance's features."""

    def __init__(self, width: int = 32, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width * 2, width * 2, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(width * 2 * (IMAGE_SIZE // 4) ** 2, features),
            nn.SiLU(),
        )
        self.head = nn.Linear(features, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))

    def shapes(self, images: torch.Tensor) -> torch.Tensor:
        """The predicted shape (index into SHAPES): the class probabilities summed per shape."""
        probs = self(images).softmax(dim=-1).reshape(len(images), len(SHAPES), -1)
        return probs.sum(dim=-1).argmax(dim=-1)


def train_classifier(
    data: ShapesData, steps: int = 600, batch: int = 128, seed: int = 0, device: str = "cpu"
) -> ShapesClassifier:
    torch.manual_seed(seed)
    model = ShapesClassifier().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="classifier", mininterval=5):
        index = torch.randint(0, len(data.labels), (batch,), generator=generator)
        loss = nn.functional.cross_entropy(model(data.images[index].to(device)), data.labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()
