"""The one codec-compatibility rule between a run's encode manifest and a checkpoint."""
import pytest

from pipeline import codec_facts

MEL = {"codec": "mel", "sample_rate": 12000, "frame_rate": 75, "latent_dim": 128,
       "frames": 75, "kind": "latents", "weights_sha256": None, "bandwidth": None,
       "dtype": "float16", "pretrained": None, "shards": [], "index": {}}


def test_describe_keeps_the_recorded_facts_only():
    desc = codec_facts.describe(MEL)
    assert set(desc) == set(codec_facts.RECORDED_KEYS) & set(MEL)
    assert codec_facts.describe({"frames": 75}, "mel") == {"frames": 75, "codec": "mel"}


def test_problems_name_each_differing_fact():
    recorded = {**codec_facts.describe(MEL), "frames": 150, "codec": "encodec", "dtype": "float32"}
    assert codec_facts.problems(MEL, recorded) == ["codec: checkpoint 'encodec' vs run 'mel'",
                                                   "frames: checkpoint 150 vs run 75"]
    assert codec_facts.problems(MEL, {"latent_dim": 128}) == []   # an older, shorter record


def test_bandwidth_counts_for_codes_only():
    codes = {**MEL, "codec": "encodec", "kind": "codes", "bandwidth": 6.0}
    assert codec_facts.problems(codes, {**codes, "bandwidth": 1.5}) == [
        "bandwidth: checkpoint 1.5 vs run 6.0"]
    latents = {**codes, "kind": "latents"}
    assert codec_facts.problems(latents, {**latents, "bandwidth": 1.5}) == []


def test_check_refuses_with_the_reason():
    with pytest.raises(codec_facts.MismatchError, match="records no codec description"):
        codec_facts.check(MEL, None, "x.pt")
    with pytest.raises(codec_facts.MismatchError, match=r"refusing x.pt: .*latent_dim: checkpo"):
        codec_facts.check(MEL, {"latent_dim": 64}, "x.pt")
    codec_facts.check(MEL, codec_facts.describe(MEL), "x.pt")
