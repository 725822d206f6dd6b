"""The model the web-demo tests serve: the tiny model whose language model learnt, in a few steps, to answer the
demo's example prompts ("Sure, [SEG]." for the sample image and the sample clip, no [SEG] for a prompt about a dog),
with every other weight moved off its initialisation and the CMA's γ at a trained-like 0.75 (a trained model's
CMA changes the masks; a freshly built one has γ = 0 and changes nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transformers_maskcma.app.examples import VIDEO_PROMPT, moving_circle_frames
from transformers_maskcma.processing import save_model_folder
from transformers_maskcma.processing.samples import draw_sample_shapes
from transformers_maskcma.tiny import build_tiny_model, build_tiny_processor

IMAGE_PROMPT = "Please segment the red circle."
NO_OBJECT_PROMPT = "Please segment the dog."
SEG_ANSWER = "Sure, [SEG]."
NO_OBJECT_ANSWER = "There is no dog."
TRAINED_GAMMA = 0.75


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def build_app_model(steps: int = 40, gamma: float = TRAINED_GAMMA):
    """`(model, processor)`: see the module docstring."""
    model, tokenizer = build_tiny_model(seed=0)
    processor = build_tiny_processor(tokenizer)
    image, masks = draw_sample_shapes("shapes")
    frames = moving_circle_frames()
    samples = [
        processor(images=image, text=IMAGE_PROMPT, answer=SEG_ANSWER, masks=[masks["red circle"]]),
        processor(images=image, text=NO_OBJECT_PROMPT, answer=NO_OBJECT_ANSWER, masks=[]),
        processor(videos=frames, text=VIDEO_PROMPT, answer=SEG_ANSWER, masks=[[None] * len(frames)]),
    ]
    parameters = [p for p in model.vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        for features in samples:
            loss = model.vlm(
                input_ids=features["input_ids"],
                attention_mask=features["attention_mask"],
                pixel_values=features["pixel_values"],
                labels=features["labels"],
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    perturb_(model.sam2, seed=1)
    perturb_(model.cma, seed=2)
    with torch.no_grad():
        model.cma.gamma.fill_(gamma)
    model.eval()
    return model, processor


def save_app_model(folder: Path, **kwargs) -> Path:
    """`build_app_model` saved as a remote-code folder (`save_model_folder`); returns the folder."""
    model, processor = build_app_model(**kwargs)
    save_model_folder(model, processor, folder)
    return folder


def reference_segment(model, processor, media, prompt: str):
    """The model's own `segment` on an image (PIL) or a list of frames: `(answer, masks bool ndarray, scores)`."""
    if isinstance(media, Image.Image):
        inputs = processor(images=media, text=prompt, return_tensors="pt")
    else:
        inputs = processor(videos=media, text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.segment(**inputs, max_new_tokens=32)
    return processor.decode_answers(output.answer_ids)[0], output.masks[0].numpy().astype(bool), output.scores[0].numpy()


def decode_video(path) -> tuple[list[np.ndarray], float]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, float(stream.average_rate)
