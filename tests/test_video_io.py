"""Video inputs: PyAV decoding of files the tests write themselves, frame folders, key-frame sampling, the lazy SAM2
frame source and the errors for unusable videos."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from transformers_maskcma.tiny import build_tiny_processor
from transformers_maskcma.processing.video_io import (
    FolderFrameSource,
    ImageListFrameSource,
    PyAVFrameSource,
    Sam2FrameSource,
    open_video,
    sample_key_frames,
)

HEIGHT, WIDTH, NUM_FRAMES = 48, 64, 12


def frame_array(t: int) -> np.ndarray:
    """Frame t: grey level 20·t, with a white bar on the left (so the codec has an edge to encode)."""
    frame = np.full((HEIGHT, WIDTH, 3), 20 * t, np.uint8)
    frame[:, :8] = 255
    return frame


def write_video(path, codec="mpeg4", num_frames=NUM_FRAMES, options=None, pix_fmt="yuv420p", container_format=None):
    container = av.open(str(path), mode="w", format=container_format)
    stream = container.add_stream(codec, rate=10)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
    if options:
        stream.options = options
    for t in range(num_frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame_array(t), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    return build_tiny_processor(tiny_tokenizer)


# -- key frames ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_frames", "num_key", "sampling", "expected"),
    [
        (12, 5, "first", [0, 1, 2, 3, 4]),
        (12, 5, "uniform", [0, 3, 6, 8, 11]),  # linspace(0, 11, 5) = 0, 2.75, 5.5, 8.25, 11
        (10, 4, "uniform", [0, 3, 6, 9]),
        (7, 2, "uniform", [0, 6]),
        (3, 5, "first", [0, 1, 2]),
        (3, 5, "uniform", [0, 1, 2]),
        (1, 1, "uniform", [0]),
    ],
)
def test_key_frame_sampling(num_frames, num_key, sampling, expected):
    assert sample_key_frames(num_frames, num_key, sampling) == expected


def test_key_frame_sampling_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"key_frame_sampling='random' is not valid"):
        sample_key_frames(10, 3, "random")
    with pytest.raises(ValueError, match="num_key_frames must be an integer >= 1"):
        sample_key_frames(10, 0, "first")


# -- PyAV ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "options", "name", "container_format"),
    [
        ("mpeg4", None, "clip.mp4", None),
        ("libx264", {"bf": "2", "g": "4"}, "clip.mp4", None),  # B-frames and a 4-frame GOP: seeks to key frames
        ("libx264", None, "clip.h264", "h264"),  # raw stream without timestamps: decodes forward from the start
    ],
)
def test_pyav_decodes_every_frame_in_order_and_by_random_access(tmp_path, codec, options, name, container_format):
    path = write_video(tmp_path / name, codec, options=options, container_format=container_format)
    source = open_video(path)
    assert isinstance(source, PyAVFrameSource)
    assert (source._frame_pts is None) == (container_format == "h264")
    assert len(source) == NUM_FRAMES and source.original_size == (HEIGHT, WIDTH)
    frames = [np.asarray(frame) for frame in source]
    levels = [float(frame[:, 16:].mean()) for frame in frames]
    # lossy codec: each frame's grey level is closest to its own index
    assert [int(np.argmin([abs(level - 20 * t) for t in range(NUM_FRAMES)])) for level in levels] == list(range(12))
    for index in (7, 2, 11, 0, 5, 6, 1):
        assert np.array_equal(np.asarray(source[index]), frames[index]), index
    assert np.array_equal(np.asarray(source[-1]), frames[-1])
    with pytest.raises(IndexError, match="frame 12 is out of range for a video of 12 frames"):
        source[12]
    source.close()


def test_sequential_reading_decodes_each_frame_once(tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip.mp4")
    source = PyAVFrameSource(path)
    calls = []
    original = PyAVFrameSource._next_frame

    def counting(self, index_hint):
        calls.append(index_hint)
        return original(self, index_hint)

    monkeypatch.setattr(PyAVFrameSource, "_next_frame", counting)
    for _ in source:
        pass
    assert calls == list(range(1, NUM_FRAMES))  # frame 0 was decoded when the source opened


def test_unusable_video_files_raise_clear_errors(tmp_path):
    # a container whose video stream has zero frames
    empty = tmp_path / "empty.avi"
    container = av.open(str(empty), mode="w")
    stream = container.add_stream("mjpeg", rate=10)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuvj420p"
    container.start_encoding()  # writes the header (and the stream) without any frame
    container.close()
    with pytest.raises(ValueError, match=r"empty\.avi.*zero frames"):
        open_video(empty)
    # a codec FFmpeg cannot decode: an AVI whose FourCC is patched to an unknown one
    clip = write_video(tmp_path / "clip.avi", "mjpeg", num_frames=3, pix_fmt="yuvj420p")
    unknown = tmp_path / "unknown_codec.avi"
    unknown.write_bytes(clip.read_bytes().replace(b"MJPG", b"ZZZZ"))
    with pytest.raises(ValueError, match=r"unknown_codec\.avi.*unsupported codec"):
        open_video(unknown)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 20)
    with pytest.raises(ValueError, match=r"cannot read video file .*junk\.mp4.*corrupt"):
        open_video(junk)
    with pytest.raises(FileNotFoundError, match=r"missing\.mp4.*does not exist"):
        open_video(tmp_path / "missing.mp4")


# -- folders and lists -----------------------------------------------------------------------------------------------


def test_frame_folder_is_read_lazily_in_natural_order(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in (0, 1, 2, 10, 11):
        Image.fromarray(frame_array(t)).save(folder / f"frame{t}.png")
    (folder / "notes.txt").write_text("not a frame")
    source = open_video(folder)
    assert isinstance(source, FolderFrameSource)
    assert [p.name for p in source.frames] == ["frame0.png", "frame1.png", "frame2.png", "frame10.png", "frame11.png"]
    assert all(isinstance(p, type(folder)) for p in source.frames)  # paths, decoded on demand
    assert np.array_equal(np.asarray(source[3]), frame_array(10))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty.*zero frames"):
        open_video(empty)


def test_frames_of_different_sizes_are_rejected():
    source = ImageListFrameSource([frame_array(0), np.zeros((10, 10, 3), np.uint8)], name="clip")
    with pytest.raises(ValueError, match=r"clip: frame 1 has size \(10, 10\).*first frame has size \(48, 64\)"):
        source[1]
    with pytest.raises(ValueError, match="zero frames"):
        ImageListFrameSource([], name="clip")


def test_sam2_frame_source_gives_normalised_frames_on_demand():
    frames = ImageListFrameSource([frame_array(t) for t in range(4)])
    sam = Sam2FrameSource(frames, image_size=32)
    assert len(sam) == 4 and sam.original_size == (HEIGHT, WIDTH)
    resized = np.asarray(Image.fromarray(frame_array(2)).resize((32, 32), Image.Resampling.BILINEAR)) / 255.0
    expected = (resized - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert sam[2].shape == (3, 32, 32)
    assert np.allclose(sam[2].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    half = sam.to(dtype=torch.bfloat16)
    assert half[0].dtype == torch.bfloat16 and sam[0].dtype == torch.float32
    assert torch.equal(sam.stack([1, 3]), torch.stack([sam[1], sam[3]]))


# -- the processor on videos -----------------------------------------------------------------------------------------


def test_processor_returns_a_lazy_source_for_a_video_file(processor, tmp_path):
    path = write_video(tmp_path / "clip.mp4")
    inputs = processor(videos=str(path), text="the white bar", num_key_frames=4, key_frame_sampling="uniform")
    assert inputs["key_frame_indices"].tolist() == [0, 4, 7, 11]  # linspace(0, 11, 4) = 0, 3.67, 7.33, 11
    assert inputs["pixel_values"].shape == (4, 3, 64, 64)
    assert inputs["original_sizes"].tolist() == [[HEIGHT, WIDTH]]
    frames = inputs["video_frames"]
    assert isinstance(frames, Sam2FrameSource) and len(frames) == NUM_FRAMES
    assert frames[5].shape == (3, 128, 128)
    assert processor.tokenizer.decode(inputs["input_ids"][0]).count("<img>") == 4
    assert inputs.to("cpu")["video_frames"] is frames  # BatchFeature.to keeps the source
    stacked = processor(videos=str(path), text="the white bar", return_sam_tensor=True)
    assert "video_frames" not in stacked
    assert stacked["sam_pixel_values"].shape == (1, NUM_FRAMES, 3, 128, 128)
    assert torch.equal(stacked["sam_pixel_values"][0, 5], frames[5])
    assert stacked["key_frame_indices"].tolist() == [0, 1, 2, 3, 4]  # default: first 5


def test_processor_rejects_several_videos_and_unusable_ones(processor, tmp_path):
    frames = [frame_array(t) for t in range(3)]
    with pytest.raises(ValueError, match="got 2 videos; the processor handles one video per call"):
        processor(videos=[frames, frames], text="x")
    with pytest.raises(ValueError, match=r"key_frame_indices=\[0, 7\] must be non-empty frame indices in \[0, 2\]"):
        processor(videos=frames, text="x", key_frame_indices=[0, 7])
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"junk\.avi"):
        processor(videos=str(junk), text="x")
