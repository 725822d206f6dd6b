"""One output folder = one run: claiming, refusing, resuming and overwriting (run_folder.py)."""

import json
import struct

import pytest

from transformers_maskcma.run_folder import MANIFEST_NAME, RunFolder, RunFolderError, model_fingerprint

FINGERPRINT = {"model": {"config_sha256": "abc"}, "text": "the red circle", "threshold": 0.0}


def _claim_and_write(path, command, fingerprint):
    folder = RunFolder.claim(path, command=command, fingerprint=fingerprint)
    (folder.path / "result.txt").write_text("written by the run")
    folder.record("result.txt")
    return folder


def test_absent_folder_is_claimed_with_an_atomic_manifest(tmp_path):
    folder = RunFolder.claim(tmp_path / "out" / "run", command="predict", fingerprint=FINGERPRINT)
    manifest = json.loads((tmp_path / "out" / "run" / MANIFEST_NAME).read_text())
    assert manifest["command"] == "predict"
    assert manifest["fingerprint"] == FINGERPRINT
    assert manifest["files"] == []
    assert manifest["package_version"]
    assert manifest["created"]
    # no temporary file is left beside the manifest
    assert sorted(p.name for p in folder.path.iterdir()) == [MANIFEST_NAME]
    assert RunFolder.read_fingerprint(folder.path) == FINGERPRINT


def test_read_fingerprint_of_a_folder_without_manifest_is_none(tmp_path):
    assert RunFolder.read_fingerprint(tmp_path) is None


def test_same_run_is_refused_without_resume_and_continued_with_it(tmp_path):
    folder = RunFolder.claim(tmp_path, command="train", fingerprint=FINGERPRINT)
    (tmp_path / "checkpoint-5").mkdir()
    folder.record("checkpoint-5")
    with pytest.raises(RunFolderError, match="--resume.*--overwrite") as error:
        RunFolder.claim(tmp_path, command="train", fingerprint=FINGERPRINT)
    assert str(tmp_path) in str(error.value)
    resumed = RunFolder.claim(tmp_path, command="train", fingerprint=FINGERPRINT, resume=True)
    assert resumed.files == ["checkpoint-5"]
    assert (tmp_path / "checkpoint-5").is_dir()


def test_another_fingerprint_is_refused_naming_each_differing_key(tmp_path):
    _claim_and_write(tmp_path, "predict", FINGERPRINT)
    other = dict(FINGERPRINT, text="the blue square", model={"config_sha256": "def"})
    with pytest.raises(RunFolderError) as error:
        RunFolder.claim(tmp_path, command="predict", fingerprint=other, resume=True)
    message = str(error.value)
    assert 'model.config_sha256: "abc" vs "def"' in message
    assert 'text: "the red circle" vs "the blue square"' in message
    assert "threshold" not in message  # equal keys are not listed
    assert "--overwrite" in message and "another output folder" in message


def test_another_command_is_refused(tmp_path):
    _claim_and_write(tmp_path, "evaluate", FINGERPRINT)
    with pytest.raises(RunFolderError, match='command: "evaluate" vs "predict"'):
        RunFolder.claim(tmp_path, command="predict", fingerprint=FINGERPRINT)


def test_non_empty_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"not empty \(notes.txt\).*not a maskcma run folder"):
        RunFolder.claim(tmp_path, command="predict", fingerprint=FINGERPRINT)
    # --overwrite writes into it but never removes a file it did not write
    RunFolder.claim(tmp_path, command="predict", fingerprint=FINGERPRINT, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / MANIFEST_NAME).is_file()


def test_overwrite_removes_exactly_the_recorded_files(tmp_path):
    folder = RunFolder.claim(tmp_path, command="predict", fingerprint=FINGERPRINT)
    (tmp_path / "mask_0.png").write_bytes(b"0")
    (tmp_path / "mask_1.png").write_bytes(b"1")
    (tmp_path / "masks" / "object_0").mkdir(parents=True)
    (tmp_path / "masks" / "object_0" / "00000.png").write_bytes(b"f")
    folder.record("mask_0.png", tmp_path / "mask_1.png", "masks/object_0/00000.png")
    (tmp_path / "user_notes.txt").write_text("keep me")

    other = dict(FINGERPRINT, text="the blue square")
    fresh = RunFolder.claim(tmp_path, command="predict", fingerprint=other, overwrite=True)
    remaining = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert remaining == [MANIFEST_NAME, "user_notes.txt"]  # folders left empty by the removal go too
    assert fresh.files == []
    assert RunFolder.read_fingerprint(tmp_path) == other


def test_overwrite_removes_a_recorded_folder_tree(tmp_path):
    folder = RunFolder.claim(tmp_path, command="train", fingerprint=FINGERPRINT)
    (tmp_path / "checkpoint-1" / "sub").mkdir(parents=True)
    (tmp_path / "checkpoint-1" / "sub" / "w.bin").write_bytes(b"w")
    folder.record("checkpoint-1")
    RunFolder.claim(tmp_path, command="train", fingerprint=FINGERPRINT, overwrite=True)
    assert not (tmp_path / "checkpoint-1").exists()


def test_record_refuses_paths_outside_the_folder(tmp_path):
    folder = RunFolder.claim(tmp_path / "run", command="predict", fingerprint=FINGERPRINT)
    with pytest.raises(ValueError, match="not inside the run folder"):
        folder.record("../elsewhere.png")


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(RunFolderError, match="exclude each other"):
        RunFolder.claim(tmp_path, command="train", fingerprint=FINGERPRINT, resume=True, overwrite=True)


def test_unwritable_location_is_found_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(RunFolderError, match="cannot be created"):
        RunFolder.claim(blocker / "out", command="predict", fingerprint=FINGERPRINT)
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        RunFolder.claim(blocker, command="predict", fingerprint=FINGERPRINT)


def test_unwritable_folder_is_refused(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(RunFolderError, match="not writable.*Permission denied"):
        RunFolder.claim(tmp_path / "out", command="predict", fingerprint=FINGERPRINT)


def test_model_fingerprint_reads_config_and_safetensors_headers_only(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    weights = struct.pack("<Q", len(header)) + header + b"\0\0\0\0"
    (tmp_path / "model.safetensors").write_bytes(weights)
    (tmp_path / "config.json").write_text('{"a": 1}')
    first = model_fingerprint(tmp_path)
    assert first["weights"]["model.safetensors"]["size"] == len(weights)
    assert len(first["config_sha256"]) == 64
    # same header, different values: the same cheap fingerprint; a different config: a different one
    (tmp_path / "model.safetensors").write_bytes(weights[:-4] + b"\1\1\1\1")
    assert model_fingerprint(tmp_path) == first
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert model_fingerprint(tmp_path) != first
    assert model_fingerprint("org/some-model") == {"repo": "org/some-model"}


def test_a_claim_that_wrote_nothing_counts_as_empty(tmp_path):
    RunFolder.claim(tmp_path, command="predict", fingerprint=FINGERPRINT)  # e.g. the run failed before writing
    again = RunFolder.claim(tmp_path, command="predict", fingerprint=FINGERPRINT)
    assert again.files == []
    other = RunFolder.claim(tmp_path, command="train", fingerprint={"x": 1})
    assert RunFolder.read_fingerprint(tmp_path) == {"x": 1} and other.command == "train"
