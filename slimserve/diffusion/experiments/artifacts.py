"""The experiment's trained models, trained once and kept in a work folder (diffusers layout for the teacher)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from slimserve.diffusion.class_pipeline import ClassConditionalFlowPipeline
from slimserve.diffusion.experiments.shapes import ShapesData, make_dataset
from slimserve.diffusion.experiments.train import ShapesClassifier, new_teacher, train_classifier, train_teacher

TRAIN_SEED = 0


def training_data(count: int = 20000) -> ShapesData:
    return make_dataset(count, TRAIN_SEED)


def teacher(workdir: Path, steps: int, device: str = "cpu", patch_size: int = 2) -> ClassConditionalFlowPipeline:
    folder = workdir / "teacher"
    if not (folder / "model_index.json").exists():
        pipe = new_teacher(patch_size=patch_size)
        train_teacher(pipe, training_data(), steps, device=device)
        temporary = workdir / "teacher.partial"
        shutil.rmtree(temporary, ignore_errors=True)
        pipe.save_pretrained(temporary)
        os.replace(temporary, folder)
    pipe = ClassConditionalFlowPipeline.from_pretrained(folder).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def classifier(workdir: Path, device: str = "cpu") -> ShapesClassifier:
    path = workdir / "classifier.pt"
    model = ShapesClassifier()
    if path.exists():
        model.load_state_dict(torch.load(path, map_location=device))
        return model.to(device).eval()
    model = train_classifier(training_data(), device=device)
    torch.save(model.state_dict(), path)
    return model
