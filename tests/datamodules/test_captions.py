"""``zigma.text_encoder.CLIPCaptionEncoder`` and ``prepare --clip`` with a tiny random CLIP text model built offline
(hand-written BPE vocabulary, 1 layer, width 16) and the random AutoencoderKL of ``tests/conftest.py``."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.manifest import check_manifest
from datamodules.prepare import prepare_from_argv
from tests.datamodules.test_prepare import RES, all_samples, npy, smooth_image
from zigma.text_encoder import CLIPCaptionEncoder

pytest.importorskip("transformers", reason="CLIPCaptionEncoder wraps transformers' CLIPTextModel")
pytest.importorskip("diffusers", reason="prepare encodes latents with FrozenVAE (diffusers' AutoencoderKL)")

WIDTH = 16
CAPTIONS = {  # image -> its two captions
    "img/0.png": ["a cat", "the cat sat on a mat"],
    "img/1.png": ["a dog", "the dog ran"],
    "img/2.png": ["a cat", "two birds, 3 trees."],
    "img/3.png": ["a red car", "the car"],
}


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A CLIP tokenizer (single characters, their ``</w>`` word-end forms and two merges) and a random 1-layer
    ``CLIPTextModel`` of width 16, saved with ``save_pretrained``: nothing is downloaded."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = tmp_path_factory.mktemp("tiny_clip")
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=WIDTH,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    CLIPTextModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir) -> CLIPCaptionEncoder:
    return CLIPCaptionEncoder(str(tiny_clip_dir), batch_size=2)


def test_encoder_shapes_padding_and_truncation(encoder, tiny_clip_dir):
    captions = ["a cat", "the dog ran", "a cat", "x"]
    features = encoder.encode(captions)
    assert features.shape == (4, 77, WIDTH) and features.dtype == np.float32 and np.isfinite(features).all()
    np.testing.assert_array_equal(features[0], features[2])  # equal captions, equal features
    assert not np.allclose(features[0], features[1])
    # padding to max_length: a caption's features do not depend on the batch it is encoded with
    for caption, row in zip(captions, features):
        np.testing.assert_allclose(encoder.encode([caption])[0], row, rtol=1e-5, atol=1e-6)

    tok = encoder.tokenizer
    short = encoder.tokenize(["a cat"])
    assert short.shape == (1, 77)
    assert short[0, 0] == tok.bos_token_id and (short[0, 5:] == tok.pad_token_id).all()  # <bos> a</w> c a t</w> <eos>
    # truncation: 60 words of 2 tokens; two captions that differ after the 77th token are the same features
    long_a, long_b = " ".join(["ab"] * 60), " ".join(["ab"] * 60 + ["zz"])
    ids = encoder.tokenize([long_a, long_b])
    assert ids.shape == (2, 77) and (ids[:, -1] == tok.eos_token_id).all()
    pair = encoder.encode([long_a, long_b])
    assert pair.shape == (2, 77, WIDTH)
    np.testing.assert_array_equal(pair[0], pair[1])

    assert encoder.config() == {"name_or_path": str(tiny_clip_dir), "max_length": 77, "width": WIDTH,
                                "padding": "max_length", "layer": "last_hidden_state", "dtype": "float32"}  # fmt: skip
    assert encoder.encode([]).shape == (0, 77, WIDTH)
    with pytest.raises(ValueError, match="list of strings"):
        encoder.encode("a cat")


def test_encoder_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"name_or_path=.*not a directory.*hf download"):
        CLIPCaptionEncoder(str(tmp_path / "missing" / "clip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a CLIP tokenizer \+ text model directory"):
        CLIPCaptionEncoder(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"local_files_only=True: the hub is never contacted"):
        CLIPCaptionEncoder("zigma-tests/no-such-clip-model")


@pytest.fixture
def caption_list(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    rows = []
    for i, (rel, captions) in enumerate(CAPTIONS.items()):
        smooth_image(i, (18, 16)).save(tmp_path / rel)
        rows.append({"path": rel, "caption": captions})
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return listing


def run(src: Path, out: Path, vae: Path, *extra: str) -> dict:
    argv = ["images", str(src), "--out", str(out), "--vae", str(vae), "--resolution", str(RES), "--shard-size", "3"]
    return prepare_from_argv([*argv, "--latents", "mean", "--quiet", *extra])


def test_prepare_encodes_caption_texts(caption_list, tmp_path, tiny_vae_dir, tiny_clip_dir, encoder):
    from datamodules.webdataset import WebDataModule

    out = tmp_path / "out"
    manifest = run(caption_list, out, tiny_vae_dir, "--clip", str(tiny_clip_dir))
    assert manifest["caption_feature_shape"] == [2, 77, WIDTH]
    assert manifest["keys"]["caption_feature.npy"]["shape"] == [2, 77, WIDTH]
    assert manifest["caption_encoder"] == encoder.config()
    samples = all_samples(out)
    assert len(samples) == 4
    for sample in samples.values():
        features = npy(sample["caption_feature.npy"])
        assert features.shape == (2, 77, WIDTH) and features.dtype == np.float32
        np.testing.assert_allclose(features, encoder.encode(CAPTIONS[sample["src.txt"].decode()]), atol=1e-5)
    check_manifest(manifest, context_dim=WIDTH)

    data = WebDataModule(shards=str(out), kind="latent", latent_key="latent.npy", caption_key="caption_feature.npy",
                         batch_size=2, num_workers=0)  # fmt: skip
    assert data.context_dim == WIDTH
    batch = next(iter(data.train_dataloader()))
    assert batch["x"].shape == (2, 4, RES // 2, RES // 2) and batch["y"].shape == (2, 77, WIDTH)

    # worker processes encode the captions of their shards: the same samples
    two = run(caption_list, tmp_path / "two", tiny_vae_dir, "--clip", str(tiny_clip_dir), "--workers", "2")
    assert two["caption_encoder"] == manifest["caption_encoder"]
    for key, sample in all_samples(tmp_path / "two").items():
        np.testing.assert_allclose(npy(sample["caption_feature.npy"]), npy(samples[key]["caption_feature.npy"]),
                                   atol=1e-5)  # fmt: skip

    # a rerun resumes (same manifest); other caption texts are other inputs
    assert run(caption_list, out, tiny_vae_dir, "--clip", str(tiny_clip_dir))["splits"]["train"]["count"] == 4
    caption_list.write_text(caption_list.read_text().replace("a red car", "a blue car"))
    with pytest.raises(ValueError, match="other inputs"):
        run(caption_list, out, tiny_vae_dir, "--clip", str(tiny_clip_dir))


def test_prepare_caption_text_options(caption_list, tmp_path, tiny_vae_dir, tiny_clip_dir, encoder):
    with pytest.raises(ValueError, match="--clip PATH_OR_ID"):
        run(caption_list, tmp_path / "a", tiny_vae_dir)

    # a folder joined with a CSV of captions: one plain string or a JSON list per image (N_cap varies: null)
    captions = tmp_path / "captions.csv"
    captions.write_text('path,caption\nimg/0.png,"[""a cat"", ""a mat""]"\nimg/1.png,a dog\nimg/2.png,[b]\n'
                        "img/3.png,the car\n")  # fmt: skip
    with pytest.raises(ValueError, match="--clip PATH_OR_ID"):
        run(tmp_path / "img", tmp_path / "b", tiny_vae_dir, "--captions", str(captions))
    manifest = run(tmp_path / "img", tmp_path / "c", tiny_vae_dir, "--captions", str(captions), "--clip",
                   str(tiny_clip_dir), "--dtype", "float16")  # fmt: skip
    assert manifest["caption_feature_shape"] == [None, 77, WIDTH]
    want = {"0.png": ["a cat", "a mat"], "1.png": ["a dog"], "2.png": ["[b]"], "3.png": ["the car"]}
    for sample in all_samples(tmp_path / "c").values():
        features = npy(sample["caption_feature.npy"])
        assert features.dtype == np.float16
        expected = encoder.encode(want[sample["src.txt"].decode()])
        np.testing.assert_allclose(features.astype(np.float32), expected, rtol=1e-2, atol=1e-2)

    # --clip with precomputed features too, or with an image lacking text: one clear error each
    np.save(tmp_path / "f.npy", np.zeros((1, 77, WIDTH), np.float32))
    lines = caption_list.read_text().splitlines()
    both = tmp_path / "both.jsonl"
    both.write_text("\n".join([*lines[:3], json.dumps({"path": "img/3.png", "caption_feature": "f.npy"})]) + "\n")
    with pytest.raises(ValueError, match="also gives caption_feature"):
        run(both, tmp_path / "d", tiny_vae_dir, "--clip", str(tiny_clip_dir))
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join([*lines[:3], json.dumps({"path": "img/3.png"})]) + "\n")
    with pytest.raises(ValueError, match=r"not for 'img/3\.png'"):
        run(partial, tmp_path / "e", tiny_vae_dir, "--clip", str(tiny_clip_dir))
