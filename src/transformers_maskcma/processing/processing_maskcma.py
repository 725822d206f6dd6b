"""The MaskCMA processor: tokenizer + the VLM's image processor + the SAM2 resize + the chat layout of the image
tokens, for images and videos, for inference and for training.

This file is copied flat into Hub repositories as remote code (with `image_io.py`, `video_io.py` and
`training_features.py`): it imports only transformers, torch, numpy, PIL (and PyAV through `video_io`) and the
modules beside it.
"""

from __future__ import annotations

import importlib
import io
import os
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import BatchFeature, GotOcr2ImageProcessorPil, ProcessorMixin
from transformers.utils import logging

from .image_io import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SAM2_NORMALIZATIONS,
    check_sam_normalization,
    check_sam_resample,
    describe_input,
    image_size_hw,
    load_image,
    sam2_preprocess,
)
from .training_features import (
    check_gt_mask_resize,
    default_answer,
    normalize_object_masks,
    object_ids_from_masks,
    resize_masks,
    target_mapping,
)
from .video_io import (
    KEY_FRAME_SAMPLINGS,
    FrameSource,
    Sam2FrameSource,
    is_video_file,
    open_video,
    sample_key_frames,
)

logger = logging.get_logger(__name__)

#: InternVL-style chat layout: `<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n`.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# stand-ins rendered through the chat template to find where the media and the prompt go
_MEDIA_SENTINEL = "\u27e6maskcma-media\u27e7"
_PROMPT_SENTINEL = "\u27e6maskcma-prompt\u27e7"


class MaskCMAProcessor(ProcessorMixin):
    r"""
    Processor of [`MaskCMAModel`]: turns images or videos and a referring prompt into the model's inputs, and the
    model's low-resolution mask logits back into masks at the original size.

    Layout of a sample (the chat template places the user content; `N = image_seq_length`):
    ``<|im_start|>user\n<img><IMG_CONTEXT>×(N·tiles)</img>\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>``
    and for a video one block per key frame: ``Frame1: <img>…</img>\nFrame2: <img>…</img>\n{prompt}`` (without the
    ``FrameK: `` labels when `video_frame_labels=False`, as Sa2VA joins its key frames). With `image_placeholder` set
    (Sa2VA: ``"<image>"``), a prompt that holds the placeholder gets the image blocks in its place instead
    (``"<image>Please segment the cat."`` → ``<img>…</img>Please segment the cat.``); a prompt without it keeps the
    layout above, which is Sa2VA's ``"<image>\n{prompt}"``.

    The VLM's tiles come from `image_processor` (a PIL image processor, by default transformers'
    `GotOcr2ImageProcessorPil`, the InternVL one, which needs no torchvision). With `max_patches = 1` (the default
    of [`~MaskCMAProcessor.from_model_config`]) an image is one tile, a plain resize to the tile size; with
    `crop_to_patches=True` and `max_patches > 1` images use InternVL's dynamic tiling (a grid of tiles matching the
    aspect ratio plus a thumbnail). Video key frames are always one tile each.

    SAM2's input is a plain resize of the whole image to `sam_image_size`² (PIL, filter `sam_resample`) with
    `sam_image_mean`/`sam_image_std`.

    Our own models use the defaults below. A folder written by `maskcma convert sa2va` saves Sa2VA's conventions
    instead (see `hub_cards.convert_sa2va.sa2va_processor_settings`): no system turn in the chat template, dynamic
    tiling (1–12 tiles + thumbnail), key frames without labels, `image_placeholder="<image>"`, a bicubic SAM2 resize
    normalised in bfloat16 (`sam_normalization="sa2va_bfloat16"`), and masks upsampled through
    `mask_intermediate_size`.

    Args:
        image_processor ([`BaseImageProcessor`]): the VLM's image processor.
        tokenizer ([`PreTrainedTokenizerBase`]): the VLM's tokenizer, with the image tokens and ``[SEG]``.
        chat_template (`str`, *optional*): Jinja chat template; the user message's content must be rendered
            verbatim. Defaults to `DEFAULT_CHAT_TEMPLATE`.
        image_seq_length (`int`, *optional*, defaults to 256): image tokens per tile
            (`config.vlm_config.image_seq_length`).
        sam_image_size (`int`, *optional*, defaults to 1024): SAM2's input size `S`.
        sam_image_mean, sam_image_std (`list[float]`, *optional*): SAM2's normalisation (ImageNet).
        sam_resample (`str`, *optional*, defaults to `"bilinear"`): the filter of the SAM2 resize, `"bilinear"` or
            `"bicubic"` (Sa2VA: PIL's default filter, bicubic).
        sam_normalization (`str`, *optional*, defaults to `"float32"`): the arithmetic of the SAM2 normalisation:
            `"float32"`, or `"sa2va_bfloat16"`, Sa2VA's whatever the model's dtype: images in bfloat16 (the mean and
            std rounded to bfloat16), video frames in float32 rounded to bfloat16 (see `image_io.SAM2_NORMALIZATIONS`).
        gt_mask_size (`int`, *optional*): training masks are resized to `gt_mask_size`², by default
            `sam_image_size // 4`, the size of SAM2's low-resolution masks where the loss is computed.
        gt_mask_resize (`str`, *optional*, defaults to `"nearest"`): how: `"nearest"` (the research code; its
            targets sit `(H / gt_mask_size − 1) / 2` pixels off the cells' centres, 1.5 pixels for a 128-pixel image
            and 32×32 masks) or `"area"` (the share of each cell the object covers: soft, centred targets). See
            `training_features.resize_masks`.
        num_key_frames (`int`, *optional*, defaults to 5): key frames the VLM sees in a video.
        key_frame_sampling (`str`, *optional*, defaults to `"first"`): `"first"` (Sa2VA) or `"uniform"`.
        video_frame_labels (`bool`, *optional*, defaults to `True`): write ``FrameK: `` before the image block of
            the K-th key frame; `False` joins the blocks by new lines only (Sa2VA).
        image_placeholder (`str`, *optional*): a marker a prompt may hold once to place the image blocks (Sa2VA:
            ``"<image>"``); `None` (default): prompts hold plain text only.
        mask_intermediate_size (`int`, *optional*): `post_process_masks` upsamples the logits to this square size
            first, then to the image size (the model's `config.mask_intermediate_size`, Sa2VA: 1024).
        max_length (`int`, *optional*): longest token sequence the LLM accepts (`max_position_embeddings`);
            longer inputs raise a `ValueError`.
        seg_token, image_start_token, image_end_token, image_context_token (`str`): the special tokens.
        end_of_turn_token (`str`, *optional*): ends the answer (default: the tokenizer's EOS token).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_seq_length: int = 256,
        sam_image_size: int = 1024,
        sam_image_mean: Sequence[float] = IMAGENET_MEAN,
        sam_image_std: Sequence[float] = IMAGENET_STD,
        gt_mask_size: int | None = None,
        gt_mask_resize: str = "nearest",
        num_key_frames: int = 5,
        key_frame_sampling: str = "first",
        max_length: int | None = None,
        sam_resample: str = "bilinear",
        sam_normalization: str = "float32",
        video_frame_labels: bool = True,
        image_placeholder: str | None = None,
        mask_intermediate_size: int | None = None,
        seg_token: str = "[SEG]",
        image_start_token: str = "<img>",
        image_end_token: str = "</img>",
        image_context_token: str = "<IMG_CONTEXT>",
        end_of_turn_token: str | None = None,
        **kwargs,
    ):
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = int(image_seq_length)
        self.sam_image_size = int(sam_image_size)
        self.sam_image_mean = [float(v) for v in sam_image_mean]
        self.sam_image_std = [float(v) for v in sam_image_std]
        self.gt_mask_size = int(gt_mask_size) if gt_mask_size is not None else self.sam_image_size // 4
        self.gt_mask_resize = check_gt_mask_resize(gt_mask_resize)
        self.num_key_frames = int(num_key_frames)
        if key_frame_sampling not in KEY_FRAME_SAMPLINGS:
            raise ValueError(
                f"key_frame_sampling={key_frame_sampling!r} is not valid; use one of {list(KEY_FRAME_SAMPLINGS)}"
            )
        self.key_frame_sampling = key_frame_sampling
        self.max_length = int(max_length) if max_length is not None else None
        self.sam_resample = check_sam_resample(sam_resample)
        self.sam_normalization = check_sam_normalization(sam_normalization)
        self.video_frame_labels = bool(video_frame_labels)
        if image_placeholder is not None and (not isinstance(image_placeholder, str) or not image_placeholder.strip()):
            raise ValueError(
                f"image_placeholder={image_placeholder!r} must be a non-empty string (e.g. '<image>') or None"
            )
        self.image_placeholder = image_placeholder
        if mask_intermediate_size is not None and int(mask_intermediate_size) < 1:
            raise ValueError(f"mask_intermediate_size={mask_intermediate_size!r} must be a positive integer or None")
        self.mask_intermediate_size = int(mask_intermediate_size) if mask_intermediate_size is not None else None
        self.seg_token = seg_token
        self.image_start_token = image_start_token
        self.image_end_token = image_end_token
        self.image_context_token = image_context_token
        self.end_of_turn_token = end_of_turn_token if end_of_turn_token is not None else tokenizer.eos_token
        if self.end_of_turn_token is None:
            raise ValueError("the tokenizer has no EOS token; pass end_of_turn_token (e.g. '<|im_end|>')")
        ids = {}
        for field in ("seg_token", "image_start_token", "image_end_token", "image_context_token", "end_of_turn_token"):
            token = getattr(self, field)
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
                raise ValueError(
                    f"{field}={token!r} is not in the tokenizer's vocabulary; add it with "
                    f"tokenizer.add_special_tokens(...) (and resize the model's embeddings)"
                )
            ids[field] = int(token_id)
        self.seg_token_id = ids["seg_token"]
        self.image_start_token_id = ids["image_start_token"]
        self.image_end_token_id = ids["image_end_token"]
        self.image_token_id = ids["image_context_token"]
        self.end_of_turn_token_id = ids["end_of_turn_token"]
        self._template_parts: tuple[list[int], list[int], list[int]] | None = None

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_model_config(cls, config, tokenizer, max_image_tiles: int = 1, **kwargs) -> MaskCMAProcessor:
        """The processor matching a [`MaskCMAConfig`]: the VLM's tile size and image tokens a tile, SAM2's input
        size, the LLM's context length.

        Args:
            config ([`MaskCMAConfig`]): the model's configuration.
            tokenizer: the model's tokenizer.
            max_image_tiles (`int`, defaults to 1): 1 = one tile an image (a plain resize); more enables InternVL's
                dynamic tiling with a thumbnail, up to this many tiles.
            kwargs: further `MaskCMAProcessor` arguments (`num_key_frames`, `key_frame_sampling`, …).
        """
        vlm_config = config.vlm_config
        vision_size = vlm_config.vision_config.image_size
        tile = int(vision_size[0] if isinstance(vision_size, (list, tuple)) else vision_size)
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": tile, "width": tile},
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            crop_to_patches=max_image_tiles > 1,
            min_patches=1,
            max_patches=max(1, int(max_image_tiles)),
        )
        text_config = vlm_config.get_text_config()
        sam_image_size = int(config.sam2_config.image_size)
        kwargs.setdefault("image_seq_length", int(vlm_config.image_seq_length))
        kwargs.setdefault("sam_image_size", sam_image_size)
        kwargs.setdefault("max_length", getattr(text_config, "max_position_embeddings", None))
        kwargs.setdefault("chat_template", getattr(tokenizer, "chat_template", None))
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "pixel_values",
            "sam_pixel_values",
            "original_sizes",
            "text_token_mask",
            "video_frames",
            "key_frame_indices",
        ]

    # -- token layout ------------------------------------------------------------------------------------------

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _chat_parts(self) -> tuple[list[int], list[int], list[int]]:
        """Token ids of the chat template around the media and the prompt: `(before media, between media and
        prompt, after prompt up to the assistant's answer)`."""
        if self._template_parts is None:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{_MEDIA_SENTINEL}\n{_PROMPT_SENTINEL}"}],
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
            if rendered.count(_MEDIA_SENTINEL) != 1 or rendered.count(_PROMPT_SENTINEL) != 1:
                raise ValueError(
                    "the processor's chat_template must render the user message's content exactly once and verbatim"
                )
            before, rest = rendered.split(_MEDIA_SENTINEL)
            between, after = rest.split(_PROMPT_SENTINEL)
            self._template_parts = (self._tokenize(before), self._tokenize(between), self._tokenize(after))
        return self._template_parts

    def media_token_ids(self, tiles_per_frame: Sequence[int], is_video: bool) -> list[int]:
        """Token ids of the image blocks: `<img><IMG_CONTEXT>×(image_seq_length·tiles)</img>` for an image; for a
        video, one block per key frame, separated by new lines, each preceded by `FrameK: ` when
        `video_frame_labels`."""
        ids: list[int] = []
        for index, tiles in enumerate(tiles_per_frame):
            if is_video:
                if index > 0:
                    ids += self._tokenize("\n")
                if self.video_frame_labels:
                    ids += self._tokenize(f"Frame{index + 1}: ")
            ids += [self.image_start_token_id]
            ids += [self.image_token_id] * (self.image_seq_length * int(tiles))
            ids += [self.image_end_token_id]
        return ids

    def _check_prompt(self, prompt, name: str) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{name}: the prompt must be a non-empty string, got {prompt!r}")
        for token in (self.seg_token, self.image_start_token, self.image_end_token, self.image_context_token):
            if token in prompt:
                raise ValueError(
                    f"{name}: the prompt {prompt!r} contains the special token {token!r}; the processor places the "
                    "image tokens itself and [SEG] only belongs in answers"
                )
        if self.image_placeholder is not None and prompt.count(self.image_placeholder) > 1:
            raise ValueError(
                f"{name}: the prompt {prompt!r} holds the image placeholder {self.image_placeholder!r} "
                f"{prompt.count(self.image_placeholder)} times; write it once (where the image goes) or not at all"
            )
        return prompt

    def encode_prompt(
        self, prompt: str, tiles_per_frame: Sequence[int], is_video: bool, name: str = "text"
    ) -> tuple[list[int], list[bool]]:
        """The prompt up to the assistant's answer: `(input_ids, text_token_mask)` with the mask on the prompt's own
        text tokens only (not the image tokens, not the template).

        Every piece is tokenized on its own; the pieces meet at special tokens (``<img>``, ``</img>``, the
        template's ``<|im_end|>``), where the tokenizer splits a whole string too, so the ids equal those of the
        rendered text tokenized at once (as Sa2VA tokenizes it). A prompt that begins with a new line is the
        exception: it joins the template's new line after the image."""
        prompt = self._check_prompt(prompt, name)
        before, between, after = self._chat_parts()
        media = self.media_token_ids(tiles_per_frame, is_video)
        if self.image_placeholder is not None and self.image_placeholder in prompt:
            head, tail = (self._tokenize(part) for part in prompt.split(self.image_placeholder))
            ids = before + head + media + tail + after
            mask = [False] * len(before) + [True] * len(head) + [False] * len(media) + [True] * len(tail)
            return ids, mask + [False] * len(after)
        prompt_ids = self._tokenize(prompt)
        ids = before + media + between + prompt_ids + after
        mask = [False] * (len(before) + len(media) + len(between)) + [True] * len(prompt_ids) + [False] * len(after)
        return ids, mask

    def _check_length(self, length: int, name: str, prompt: str, reserve: int = 0) -> None:
        if self.max_length is not None and length + reserve > self.max_length:
            preview = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            raise ValueError(
                f"{name}: the prompt {preview!r} is {length} tokens long with its image tokens"
                + (f" (+{reserve} for the answer)" if reserve else "")
                + f", more than the model's maximum of {self.max_length} tokens (max_position_embeddings); "
                "shorten the prompt or use fewer key frames / image tiles"
            )

    def sam2_arguments(self, video: bool) -> dict:
        """`image_io.sam2_preprocess` arguments of an image (`video=False`) or a video frame: size, mean/std, filter
        and the arithmetic of `sam_normalization`."""
        image_rule, frame_rule = SAM2_NORMALIZATIONS[self.sam_normalization]
        return {
            "image_size": self.sam_image_size,
            "image_mean": self.sam_image_mean,
            "image_std": self.sam_image_std,
            "resample": self.sam_resample,
            **(frame_rule if video else image_rule),
        }

    # -- inputs ------------------------------------------------------------------------------------------------

    @staticmethod
    def _as_list(value) -> list:
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def _vlm_tiles(self, images: list[Image.Image], single_tile: bool) -> tuple[torch.Tensor, list[int]]:
        kwargs = {"crop_to_patches": False} if single_tile else {}
        encoded = self.image_processor(images=images, return_tensors="pt", **kwargs)
        num_patches = [int(n) for n in torch.as_tensor(encoded["num_patches"]).tolist()]
        return encoded["pixel_values"], num_patches

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        answer: str | None = None,
        masks=None,
        return_tensors: str | None = "pt",
        num_key_frames: int | None = None,
        key_frame_sampling: str | None = None,
        key_frame_indices: Sequence[int] | None = None,
        return_sam_tensor: bool = False,
        train_frames: str = "key",
        **kwargs,
    ) -> BatchFeature:
        r"""
        Prepare images or a video and prompts for [`MaskCMAModel.segment`] (inference), or one sample with its
        answer and ground-truth masks for [`MaskCMAModel.forward`] (training: pass `answer` and/or `masks`).

        Args:
            images: one image or a list (PIL images, numpy arrays `(H, W, 3)`, paths), one prompt each.
            text (`str` or `list[str]`): the referring prompts (one per image; one for a video).
            videos: one video: a video file (PyAV), a folder of frames, a list of frames or an array `(T, H, W, 3)`.
            answer (`str`, *optional*): training: the target answer with one ``[SEG]`` per object; `None` or `""`
                uses `default_answer(num_objects)`.
            masks (*optional*): training: per object the mask at the original size (an image) or a list of one mask
                per frame of the video.
            return_tensors: `"pt"` (the only supported type; `None` means `"pt"`).
            num_key_frames, key_frame_sampling: override the processor's key-frame settings for this call.
            key_frame_indices (`list[int]`, *optional*): explicit key frames of the video (e.g. random ones in
                training).
            return_sam_tensor (`bool`): inference on a video: return every SAM2 frame as `sam_pixel_values`
                `(1, T, 3, S, S)` instead of the lazy `video_frames` (short clips only: holds all frames).
            train_frames (`str`): training on a video: `"key"` decodes the key frames with SAM2 (default), `"all"`
                every frame of the clip.

        Returns:
            [`BatchFeature`]. Inference on images: `input_ids` `(B, L)` (left-padded), `attention_mask` `(B, L)`,
            `text_token_mask` `(B, L)`, `pixel_values` `(num_tiles, 3, t, t)`, `sam_pixel_values` `(B, 3, S, S)`,
            `original_sizes` `(B, 2)`. Inference on a video: the same text fields `(1, L)`, `pixel_values`
            `(K, 3, t, t)` for the `K` key frames, `video_frames` (a [`Sam2FrameSource`]: `len()` frames,
            `video_frames[i]` the `(3, S, S)` SAM2 input of frame `i`, decoded on demand), `key_frame_indices`
            `(K,)`, `original_sizes` `(1, 2)`. Training: `input_ids`, `attention_mask`, `labels` (-100 except on
            the answer and its end token), `text_token_mask` `(1, L)`, `pixel_values`, `sam_pixel_values`
            `(F, 3, S, S)`, `frame_sample_index` `(F,)`, `gt_masks` `(num_targets, g, g)` float,
            `target_seg_index`, `target_frame_index` `(num_targets,)`, `seg_object_ids` `(num_objects,)`,
            `original_sizes` `(1, 2)`.
        """
        if kwargs:
            raise TypeError(f"MaskCMAProcessor got unexpected arguments {sorted(kwargs)}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; MaskCMA works with 'pt' tensors")
        if (images is None) == (videos is None):
            raise ValueError("pass either images=... or videos=... (exactly one of them)")
        if text is None:
            raise ValueError("pass the referring prompt(s) as text=...")
        training = answer is not None or masks is not None
        if videos is not None:
            if training:
                return self._video_training(
                    videos, text, answer, masks, num_key_frames, key_frame_sampling, key_frame_indices, train_frames
                )
            return self._video_inference(
                videos, text, num_key_frames, key_frame_sampling, key_frame_indices, return_sam_tensor
            )
        if training:
            return self._image_training(images, text, answer, masks)
        return self._image_inference(images, text)

    # -- images ------------------------------------------------------------------------------------------------

    def _pair_images_and_prompts(self, images, text) -> tuple[list, list[str]]:
        image_list = self._as_list(images)
        prompts = self._as_list(text)
        if len(image_list) == 0:
            raise ValueError("images=[] holds no image; pass at least one image")
        if len(image_list) != len(prompts):
            raise ValueError(
                f"got {len(image_list)} image(s) but {len(prompts)} prompt(s); pass exactly one prompt per image"
            )
        return image_list, prompts

    def _image_inference(self, images, text) -> BatchFeature:
        image_list, prompts = self._pair_images_and_prompts(images, text)
        pil_images = [
            load_image(image, name=f"images[{i}] ({describe_input(image)})") for i, image in enumerate(image_list)
        ]
        pixel_values, num_patches = self._vlm_tiles(pil_images, single_tile=False)
        sequences, text_masks = [], []
        for i, (prompt, tiles) in enumerate(zip(prompts, num_patches)):
            ids, mask = self.encode_prompt(prompt, [tiles], is_video=False, name=f"text[{i}]")
            self._check_length(len(ids), f"text[{i}]", prompt, reserve=1)
            sequences.append(ids)
            text_masks.append(mask)
        input_ids, attention_mask, text_token_mask = self._left_pad(sequences, text_masks)
        sam_pixel_values = torch.stack(
            [
                sam2_preprocess(image, **self.sam2_arguments(video=False))
                for image in pil_images
            ]
        )
        original_sizes = torch.tensor([image_size_hw(image) for image in pil_images], dtype=torch.long)
        return BatchFeature(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "text_token_mask": text_token_mask,
                "pixel_values": pixel_values,
                "sam_pixel_values": sam_pixel_values,
                "original_sizes": original_sizes,
            }
        )

    def _left_pad(
        self, sequences: list[list[int]], text_masks: list[list[bool]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), int(pad_id), dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        text_token_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
        for row, (ids, mask) in enumerate(zip(sequences, text_masks)):
            start = length - len(ids)
            input_ids[row, start:] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, start:] = 1
            text_token_mask[row, start:] = torch.tensor(mask, dtype=torch.bool)
        return input_ids, attention_mask, text_token_mask

    def _answer_ids(self, answer: str | None, num_objects: int, media: str) -> tuple[str, list[int]]:
        if answer is None or answer == "":
            answer = default_answer(num_objects, self.seg_token, media)
        if not isinstance(answer, str):
            raise TypeError(f"answer must be a string, got {type(answer).__name__}")
        ids = self._tokenize(answer) + [self.end_of_turn_token_id]
        num_seg = sum(1 for token in ids if token == self.seg_token_id)
        if num_seg != num_objects:
            raise ValueError(
                f"the answer {answer!r} has {num_seg} {self.seg_token} token(s) but {num_objects} object mask(s) were "
                f"given; give one mask per {self.seg_token} in the answer's order (or an empty answer for the default "
                "template)"
            )
        return answer, ids

    def _training_sequence(
        self, prompt: str, answer: str | None, num_objects: int, tiles_per_frame: list[int], is_video: bool
    ) -> dict[str, torch.Tensor]:
        prompt_ids, prompt_mask = self.encode_prompt(prompt, tiles_per_frame, is_video, name="text")
        answer_text, answer_ids = self._answer_ids(answer, num_objects, "video" if is_video else "image")
        ids = prompt_ids + answer_ids
        self._check_length(len(ids), "text", prompt)
        labels = [-100] * len(prompt_ids) + answer_ids
        text_mask = prompt_mask + [False] * len(answer_ids)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "text_token_mask": torch.tensor([text_mask], dtype=torch.bool),
        }

    def _single_prompt(self, text, what: str) -> str:
        prompts = self._as_list(text)
        if len(prompts) != 1:
            raise ValueError(f"got {len(prompts)} prompts for one {what}; pass exactly one prompt per {what}")
        return prompts[0]

    def _image_training(self, images, text, answer, masks) -> BatchFeature:
        image_list = self._as_list(images)
        if len(image_list) != 1:
            raise ValueError(
                f"training mode processes one sample at a time, got {len(image_list)} images; process each sample "
                "and batch them with MaskCMADataCollator"
            )
        prompt = self._single_prompt(text, "image")
        image = load_image(image_list[0], name=f"images[0] ({describe_input(image_list[0])})")
        size = image_size_hw(image)
        object_masks = normalize_object_masks(masks, size, num_frames=None)
        pixel_values, num_patches = self._vlm_tiles([image], single_tile=False)
        features = self._training_sequence(prompt, answer, len(object_masks), num_patches, is_video=False)
        seg_index, frame_index = target_mapping(len(object_masks), 1)
        features.update(
            {
                "pixel_values": pixel_values,
                "sam_pixel_values": sam2_preprocess(image, **self.sam2_arguments(video=False))[None],
                "frame_sample_index": torch.zeros(1, dtype=torch.long),
                "gt_masks": resize_masks([m[0] for m in object_masks], self.gt_mask_size, self.gt_mask_resize),
                "target_seg_index": seg_index,
                "target_frame_index": frame_index,
                "seg_object_ids": torch.tensor(object_ids_from_masks(object_masks), dtype=torch.long),
                "original_sizes": torch.tensor([size], dtype=torch.long),
            }
        )
        return BatchFeature(features)

    # -- videos ------------------------------------------------------------------------------------------------

    def _open_single_video(self, videos) -> FrameSource:
        if (
            isinstance(videos, (list, tuple))
            and videos
            and all(
                isinstance(v, (list, tuple, FrameSource)) or (isinstance(v, (str, os.PathLike)) and _is_video_like(v))
                for v in videos
            )
        ):
            if len(videos) != 1:
                raise ValueError(
                    f"got {len(videos)} videos; the processor handles one video per call (call it once per video)"
                )
            videos = videos[0]
        return open_video(videos, name="videos")

    def _key_frames(self, num_frames: int, num_key_frames, sampling, explicit) -> list[int]:
        if explicit is not None:
            indices = [int(i) for i in (explicit.tolist() if isinstance(explicit, torch.Tensor) else explicit)]
            if not indices or any(i < 0 or i >= num_frames for i in indices):
                raise ValueError(
                    f"key_frame_indices={indices} must be non-empty frame indices in [0, {num_frames - 1}]"
                )
            return indices
        return sample_key_frames(
            num_frames,
            self.num_key_frames if num_key_frames is None else num_key_frames,
            self.key_frame_sampling if sampling is None else sampling,
        )

    def _video_text(self, frames: FrameSource, key_indices: list[int]) -> tuple[torch.Tensor, list[int]]:
        key_images = [frames[i] for i in key_indices]
        return self._vlm_tiles(key_images, single_tile=True)

    def _video_inference(self, videos, text, num_key_frames, sampling, explicit, return_sam_tensor) -> BatchFeature:
        frames = self._open_single_video(videos)
        prompt = self._single_prompt(text, "video")
        key_indices = self._key_frames(len(frames), num_key_frames, sampling, explicit)
        pixel_values, num_patches = self._video_text(frames, key_indices)
        ids, mask = self.encode_prompt(prompt, num_patches, is_video=True, name="text")
        self._check_length(len(ids), "text", prompt, reserve=1)
        arguments = self.sam2_arguments(video=True)
        sam_frames = Sam2FrameSource(
            frames,
            arguments["image_size"],
            arguments["image_mean"],
            arguments["image_std"],
            resample=arguments["resample"],
            round_to=arguments.get("round_to"),
        )
        data = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
            "text_token_mask": torch.tensor([mask], dtype=torch.bool),
            "pixel_values": pixel_values,
            "key_frame_indices": torch.tensor(key_indices, dtype=torch.long),
            "original_sizes": torch.tensor([frames.original_size], dtype=torch.long),
        }
        if return_sam_tensor:
            data["sam_pixel_values"] = sam_frames.stack()[None]
        else:
            data["video_frames"] = sam_frames
        return BatchFeature(data, skip_tensor_conversion=["video_frames"])

    def _video_training(
        self, videos, text, answer, masks, num_key_frames, sampling, explicit, train_frames
    ) -> BatchFeature:
        if train_frames not in ("key", "all"):
            raise ValueError(f"train_frames={train_frames!r} is not valid; use 'key' or 'all'")
        frames = self._open_single_video(videos)
        prompt = self._single_prompt(text, "video")
        object_masks = normalize_object_masks(masks, frames.original_size, num_frames=len(frames))
        key_indices = self._key_frames(len(frames), num_key_frames, sampling, explicit)
        sam_indices = key_indices if train_frames == "key" else list(range(len(frames)))
        pixel_values, num_patches = self._video_text(frames, key_indices)
        features = self._training_sequence(prompt, answer, len(object_masks), num_patches, is_video=True)
        sam_pixel_values = torch.stack(
            [
                sam2_preprocess(frames[i], **self.sam2_arguments(video=True))
                for i in sam_indices
            ]
        )
        gt = resize_masks(
            [object_masks[o][f] for o in range(len(object_masks)) for f in sam_indices],
            self.gt_mask_size,
            self.gt_mask_resize,
        )
        seg_index, frame_index = target_mapping(len(object_masks), len(sam_indices))
        features.update(
            {
                "pixel_values": pixel_values,
                "sam_pixel_values": sam_pixel_values,
                "frame_sample_index": torch.zeros(len(sam_indices), dtype=torch.long),
                "gt_masks": gt,
                "target_seg_index": seg_index,
                "target_frame_index": frame_index,
                "seg_object_ids": torch.tensor(
                    object_ids_from_masks([[m[f] for f in sam_indices] for m in object_masks]), dtype=torch.long
                ),
                "key_frame_indices": torch.tensor(key_indices, dtype=torch.long),
                "original_sizes": torch.tensor([frames.original_size], dtype=torch.long),
            }
        )
        frames.close()
        return BatchFeature(features)

    # -- records -----------------------------------------------------------------------------------------------

    def prepare_record(self, record: dict, **kwargs) -> BatchFeature:
        """Training features of one record of `transformers_maskcma.data.schema.RECORD_FEATURES` (frames, prompt,
        answer, `masks[object][frame]` as COCO RLE). Needs the `transformers_maskcma` package (for the record
        schema's RLE decoding).

        Args:
            record: a decoded `datasets` row (frames as PIL images, or `{"bytes", "path"}` dicts).
            kwargs: passed to `__call__` (e.g. `key_frame_indices`, `train_frames`).
        """
        decode_rle = _schema_decode_rle()
        name = record.get("sample_id", "record")
        frames = [_record_frame(frame, f"{name}, frame {i}") for i, frame in enumerate(record["frames"])]
        if not frames:
            raise ValueError(f"record {name!r} has zero frames")
        size = image_size_hw(frames[0])
        masks = []
        for obj, object_rles in enumerate(record["masks"]):
            if len(object_rles) != len(frames):
                raise ValueError(
                    f"record {name!r}: masks[{obj}] has {len(object_rles)} frame masks for {len(frames)} frames"
                )
            per_frame = []
            for frame, rle in enumerate(object_rles):
                try:
                    per_frame.append(decode_rle(rle, expected_size=size))
                except ValueError as error:
                    raise ValueError(f"record {name!r}: masks[{obj}][{frame}]: {error}") from error
            masks.append(per_frame)
        answer = record.get("answer") or None
        if record["media_type"] == "image":
            if len(frames) != 1:
                raise ValueError(f"record {name!r} is an image record with {len(frames)} frames; expected one")
            return self(images=frames[0], text=record["prompt"], answer=answer, masks=[m[0] for m in masks], **kwargs)
        if record["media_type"] != "video":
            raise ValueError(f"record {name!r} has media_type {record['media_type']!r}; expected 'image' or 'video'")
        return self(videos=frames, text=record["prompt"], answer=answer, masks=masks, **kwargs)

    # -- outputs -----------------------------------------------------------------------------------------------

    def post_process_masks(self, mask_logits, original_sizes, threshold: float = 0.0) -> list[torch.Tensor]:
        """Low-resolution mask logits → boolean masks at the original size (bilinear upsampling of the logits,
        through `mask_intermediate_size`² when set, then `logit > threshold`; 0.0 ⇔ sigmoid > 0.5), as the model's
        `segment` computes them.

        Args:
            mask_logits: one tensor `(num_objects, [num_frames,] h, w)` for one sample, or a list of them (e.g.
                `MaskCMASegmentationOutput.mask_logits`).
            original_sizes: `(batch_size, 2)` `(height, width)` per sample (tensor or list of pairs).
            threshold: logit threshold.

        Returns:
            a list with one `(num_objects, [num_frames,] H, W)` bool tensor per sample.
        """
        logits_list = [mask_logits] if isinstance(mask_logits, torch.Tensor) else list(mask_logits)
        sizes = original_sizes.tolist() if isinstance(original_sizes, torch.Tensor) else list(original_sizes)
        if sizes and not isinstance(sizes[0], (list, tuple)):
            sizes = [sizes]
        if len(sizes) != len(logits_list):
            raise ValueError(
                f"post_process_masks got {len(logits_list)} samples of mask logits but {len(sizes)} original sizes"
            )
        return [
            upsample_mask_logits(logits, (int(h), int(w)), self.mask_intermediate_size) > threshold
            for logits, (h, w) in zip(logits_list, sizes)
        ]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode_answers(self, answer_ids) -> list[str]:
        """The answer text of each sample: `answer_ids` is what `MaskCMAModel.segment` returns (a list of 1-D token
        tensors, or a stream's `[stream.answer_ids]`). ``[SEG]`` stays; the end-of-turn, end-of-sequence and padding
        tokens are removed and the text is stripped."""
        removed = {self.end_of_turn_token, self.tokenizer.eos_token, self.tokenizer.pad_token} - {None, ""}
        answers = []
        for ids in answer_ids:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            for token in removed:
                text = text.replace(token, "")
            answers.append(text.strip())
        return answers

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def upsample_mask_logits(
    mask_logits: torch.Tensor, size: tuple[int, int], intermediate_size: int | None = None
) -> torch.Tensor:
    """Bilinear upsampling of logits `(..., h, w)` to `(..., height, width)`, through `intermediate_size`² first
    when given; the same computation as the model's `mask_decoding.upsample_mask_logits` (SAM2's input is a plain
    resize, so interpolation maps it back)."""
    leading = mask_logits.shape[:-2]
    flat = mask_logits.reshape(-1, 1, *mask_logits.shape[-2:]).float()
    if flat.shape[0] == 0:
        return mask_logits.new_zeros(*leading, *size, dtype=torch.float32)
    if intermediate_size is not None:
        square = (int(intermediate_size), int(intermediate_size))
        flat = torch.nn.functional.interpolate(flat, size=square, mode="bilinear", align_corners=False)
    upsampled = torch.nn.functional.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return upsampled.reshape(*leading, *upsampled.shape[-2:])


def _is_video_like(path) -> bool:
    return os.path.isdir(path) or is_video_file(path)


def _record_frame(frame, name: str) -> Image.Image:
    """A frame of a `datasets` record: a PIL image, or an undecoded `{"bytes", "path"}` dict."""
    if isinstance(frame, dict):
        if frame.get("bytes"):
            try:
                with Image.open(io.BytesIO(frame["bytes"])) as opened:
                    return opened.convert("RGB")
            except OSError as error:
                raise ValueError(f"{name}: the stored image bytes are not a readable image ({error})") from error
        if frame.get("path"):
            return load_image(frame["path"], name=name)
        raise ValueError(f"{name}: the frame has neither bytes nor a path")
    return load_image(frame, name=name)


def _schema_decode_rle():
    """`transformers_maskcma.data.schema.decode_rle` (records are a concept of the package, not of remote code)."""
    try:
        schema = importlib.import_module("transformers_maskcma.data.schema")
    except ImportError as error:
        raise ImportError(
            "prepare_record decodes the record masks with transformers_maskcma.data.schema; install the "
            "transformers-maskcma package to use it"
        ) from error
    return schema.decode_rle


__all__ = ["DEFAULT_CHAT_TEMPLATE", "MaskCMAProcessor", "upsample_mask_logits"]
