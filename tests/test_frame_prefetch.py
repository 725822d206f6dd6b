"""Background prefetching of video frames (`processing.video_io.FramePrefetcher`, `Sam2FrameSource(prefetch=...)`):
the frames are the same as without it, the next ones are read ahead in the direction of reading on one thread, and
errors reach the caller."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_maskcma.processing.video_io import FramePrefetcher, ImageListFrameSource, Sam2FrameSource


class CountingFrames(ImageListFrameSource):
    """Random RGB frames that record which thread read which frame."""

    def __init__(self, num_frames: int, size: int = 24, bad_frame: int | None = None):
        rng = np.random.default_rng(0)
        frames = [Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)) for _ in range(num_frames)]
        self.reads: list[tuple[int, str]] = []
        self.bad_frame = bad_frame
        super().__init__(frames)
        self.reads.clear()  # the constructor reads frame 0 for the size

    def _load(self, index: int) -> Image.Image:
        self.reads.append((index, threading.current_thread().name))
        if index == self.bad_frame:
            raise ValueError(f"frame {index} is corrupt")
        return super()._load(index)


def test_prefetched_frames_equal_frames_read_on_demand_in_any_order():
    plain = Sam2FrameSource(CountingFrames(7), image_size=32, prefetch=0)
    prefetching = Sam2FrameSource(CountingFrames(7), image_size=32, prefetch=2)
    order = [0, 1, 2, 3, 6, 5, 4, 0, -1]
    for index in order:
        assert torch.equal(prefetching[index], plain[index]), index
    assert [tensor.shape for tensor in prefetching] == [(3, 32, 32)] * 7
    prefetching.close()


def test_the_next_frames_are_queued_in_the_reading_direction_and_read_on_one_worker_thread():
    frames = CountingFrames(10)
    source = Sam2FrameSource(frames, image_size=32, prefetch=3)
    source[2]
    assert source.prefetcher.queued == [3, 4, 5]
    source[3]  # taken from the queue: no new read of frame 3
    assert source.prefetcher.queued == [4, 5, 6]
    source[8]  # a jump: the old queue is dropped
    assert source.prefetcher.queued == [9]
    source[7]  # reading backwards (propagation before the first key frame)
    assert source.prefetcher.queued == [4, 5, 6]
    source.close()
    read_indices = [index for index, _ in frames.reads]
    assert read_indices.count(3) == 1 and read_indices.count(2) == 1
    threads = {name for _, name in frames.reads}
    assert len(threads) == 1 and threads != {threading.current_thread().name}  # one worker, not the caller


def test_a_frame_error_is_raised_by_the_read_of_that_frame():
    source = Sam2FrameSource(CountingFrames(5, bad_frame=2), image_size=32, prefetch=2)
    source[1]  # queues 2 and 3: frame 2's error waits for its own read
    with pytest.raises(ValueError, match="frame 2 is corrupt"):
        source[2]
    assert source[3].shape == (3, 32, 32)
    with pytest.raises(IndexError, match="out of range"):
        source[5]
    source.close()


def test_copies_share_the_reader_and_pickled_copies_read_on_demand():
    source = Sam2FrameSource(CountingFrames(4), image_size=32, prefetch=2)
    half = source.to(dtype=torch.bfloat16)
    assert half.prefetcher is source.prefetcher  # one thread reads the frames of both
    assert half[0].dtype == torch.bfloat16 and torch.equal(half[0], source[0].to(torch.bfloat16))
    duplicate = copy.deepcopy(source)
    assert duplicate.prefetcher is None and torch.equal(duplicate[1], source[1])
    source.close()


def test_prefetch_settings_are_validated():
    with pytest.raises(ValueError, match="prefetch=-1"):
        Sam2FrameSource(CountingFrames(2), image_size=32, prefetch=-1)
    with pytest.raises(ValueError, match="depth=0"):
        FramePrefetcher(lambda index: index, length=3, depth=0)
