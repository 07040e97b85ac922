"""The run folder's layout module: names, paths and the small shared readers."""
import json

import pytest

from pipeline import run_folder as rf


def test_paths_go_through_the_step_folders(tmp_path):
    assert rf.pairs_file(tmp_path, "val") == tmp_path / "pairs" / "val.jsonl"
    assert rf.encode_manifest(tmp_path) == tmp_path / "encode" / "manifest.json"
    assert rf.stage_file(tmp_path, "stage2", rf.GATE) == tmp_path / "stage2" / "gate.json"
    assert rf.epoch_checkpoint(tmp_path, 4).name == "epoch_4.pt"
    assert rf.epoch_checkpoint(tmp_path, 4, discriminator_only=True).name == "epoch_4_d.pt"
    assert rf.EPOCH_FILE.match("epoch_4_d.pt").groups() == ("4", "_d")
    assert rf.marker_name() == "step_state.json"
    assert rf.marker_name(1, 3) == "step_state-1-of-3.json"
    tag = rf.shard_tag(0, 2)
    manifest = rf.chunk_manifest(tmp_path, tag)
    assert rf.CHUNK_MANIFEST_RE.search(manifest.name).groups() == ("0", "2")
    assert rf.summary_for_manifest(manifest) == rf.chunk_summary(tmp_path, tag).name


def test_default_checkpoint_is_stage3_last_unless_configured(tmp_path):
    assert rf.default_checkpoint(tmp_path) == tmp_path / "stage3" / "last.pt"
    assert str(rf.default_checkpoint(tmp_path, "/x/best.pt")) == "/x/best.pt"


def test_read_pairs_names_file_and_line(tmp_path):
    path = rf.pairs_file(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="pairs step"):
        rf.read_pairs(path)
    path.parent.mkdir()
    path.write_text('{"song": "a", "input": 0, "target_song": "a", "target": 1}\n\n{"song": "b"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:3: pair is missing keys"):
        rf.read_pairs(path)


def test_gate_and_exit_readers(tmp_path):
    assert rf.read_gate(tmp_path, "stage1") is None
    rf.step_dir(tmp_path, "stage1").mkdir()
    rf.stage_file(tmp_path, "stage1", rf.GATE).write_text(json.dumps({"passed": False}))
    rf.stage_file(tmp_path, "stage1", rf.EXIT).write_text("{broken")
    assert rf.read_gate(tmp_path, "stage1") == {"passed": False}
    assert rf.read_exit(tmp_path, "stage1") is None


def test_layout_module_imports_no_steps():
    """pipeline is the bottom layer: the layout module must not pull in data_prep or jobs."""
    source = open(rf.__file__).read()
    assert "import data_prep" not in source and "from data_prep" not in source
    assert "import jobs" not in source and "from jobs" not in source


def test_chunk_encode_and_sample_files(tmp_path):
    songs = rf.songs_dir(tmp_path)
    assert songs == tmp_path / "chunk" / "songs"
    assert rf.song_array(songs, "s1").relative_to(tmp_path / "chunk").as_posix() == "songs/s1.npy"
    shard = rf.encode_shards(tmp_path) / rf.AUG_SHARD.format(3)
    assert rf.shard_listing(shard).name == "aug-00003.json"
    assert rf.CLEAN_SHARD.format(0).startswith(rf.SHARD_PREFIXES["clean"])
    files = rf.sample_files(tmp_path, 2)
    assert {k: p.name for k, p in files.items()} == {
        "wav": "sample_2.wav", "png": "sample_2.png", "masks": "masks_2.png"}
