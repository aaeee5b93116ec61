"""Image probes that cannot break (issue 21, item 6): text probes never hold media placeholder tokens;
the images-only processor fallback runs for every error transformers raises for a missing video
dependency; a processor that cannot be built or run, or that disagrees with its model, is one line
naming the folder, checked on the first batch before any statistics."""

import json
import shutil

import pytest
import torch

from dowser_tool import Sidecar, open_checkpoint
from dowser_tool.probe import prompts
from dowser_tool.probe.run import ProbeSettings, probe
from dowser_tool.score import trainable_count

from .families import build
from .test_bad_inputs import assert_clean_failure, run

SMALL = dict(probes=4, probe_len=8, batch_size=2, draws=2, update_ratio=0.25)


@pytest.fixture(scope="module")
def ovis2(tmp_path_factory):
    return build("ovis2", tmp_path_factory.mktemp("ovis2") / "ovis2")


def test_sampling_never_draws_a_suppressed_token():
    logits = torch.zeros(64, 10)
    logits[:, 3] = 50.0  # the placeholder is by far the likeliest token
    gen = torch.Generator().manual_seed(0)
    history = torch.zeros(64, 1, dtype=torch.long)
    assert (prompts.sample_next(logits, history, prompts.Sampling(), gen) == 3).all()
    drawn = prompts.sample_next(logits, history, prompts.Sampling(), gen, suppress={3})
    assert not (drawn == 3).any()


def test_placeholders_are_read_from_config_and_tokenizer(ovis2):
    ckpt = open_checkpoint(ovis2)
    ids = prompts.placeholder_token_ids(ckpt, ckpt.config)
    config = ckpt.config
    assert config["image_token_id"] in ids and set(config["visual_indicator_token_ids"]) <= ids
    tok = json.loads((ovis2 / "tokenizer.json").read_text())
    image = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<image>")
    assert image in ids  # the processor's own placeholder, named by no config key
    bos, _ = prompts.special_token_ids(ckpt, config["text_config"], config)
    assert bos not in ids


def test_ovis2_text_probes_hold_no_placeholder_even_when_the_model_favours_one(ovis2, tmp_path, monkeypatch):
    """The model is made to prefer its image placeholder at every step; the probes never hold it, and the
    image probe runs (one placeholder sampled into the text made Ovis2's forward fail before)."""
    ckpt = open_checkpoint(ovis2)
    placeholders = sorted(prompts.placeholder_token_ids(ckpt, ckpt.config))
    real = prompts.sample_next

    def favour_placeholders(logits, history, sampling, gen, suppress=frozenset()):
        logits = logits.clone()
        logits[:, placeholders] = 100.0
        return real(logits, history, sampling, gen, suppress)

    monkeypatch.setattr(prompts, "sample_next", favour_placeholders)
    out = tmp_path / "ovis2.dowser.safetensors"
    probe(str(ovis2), str(out), settings=ProbeSettings(images=True, include=("vision", "projector"), **SMALL),
          progress=False)
    sc = Sidecar(out)
    tokens = sc.probe_tokens()
    assert not torch.isin(tokens, torch.tensor(placeholders)).any()
    assert sc.metadata["probe"]["images"] is True
    parts = {sc.metadata["tensor_info"][n]["part"] for n in sc.names}
    assert {"decoder", "vision"} <= parts
    for n in sc.names:
        assert int((~sc.mask(n)).sum()) == trainable_count(sc.mask(n).numel(), 0.25), n


def test_video_part_missing_with_value_error_falls_back_to_images_only(tmp_path):
    """A Qwen2-VL folder whose video processor entry names no class: without torchvision transformers raises
    ValueError ('requires `torchvision`'), not ImportError; the processor is built for images only."""
    folder = build("qwen2_vl", tmp_path / "qwen2_vl")
    path = folder / "processor_config.json"
    saved = json.loads(path.read_text())
    saved["video_processor"].pop("video_processor_type", None)
    path.write_text(json.dumps(saved))
    processor = prompts.load_processor(str(folder), "q")
    assert processor.image_processor is not None and processor.tokenizer is not None
    out = tmp_path / "m.dowser.safetensors"
    probe(str(folder), str(out), settings=ProbeSettings(images=True, **SMALL), progress=False)
    assert Sidecar(out).metadata["probe"]["images"] is True


def test_video_part_errors_are_recognised():
    assert prompts._video_part_failed(ValueError("/x requires `torchvision` to be installed. Please install"))
    assert prompts._video_part_failed(ImportError("Qwen2VLVideoProcessor requires the Torchvision library"))
    assert not prompts._video_part_failed(ValueError("Unrecognized processing class in /x"))


def test_processor_that_disagrees_with_its_model_is_one_line(tmp_path):
    """Idefics3: the processor expands each image tile to 169 tokens, the model makes 4 features per tile."""
    folder = build("idefics3", tmp_path / "idefics3")
    path = folder / "processor_config.json"
    path.write_text(path.read_text().replace('"image_seq_len": 4', '"image_seq_len": 169'))
    out = tmp_path / "out.dowser.safetensors"
    r = run(["probe", folder, "--images", "--probes", 2, "--probe-len", 4, "--batch-size", 2, "--out", out])
    assert_clean_failure(r, out, str(folder), "Idefics3Processor", "disagree", "image tokens",
                         "Image features and image tokens do not match")


def test_processor_that_cannot_be_built_is_one_line(tmp_path, monkeypatch):
    """SmolVLM whose images-only processor cannot be constructed (its __init__ wants the video processor)."""
    import transformers

    folder = build("smolvlm", tmp_path / "smolvlm")

    def needs_video(cls, *args, **kwargs):
        raise TypeError("SmolVLMProcessor.__init__() missing 1 required positional argument: 'video_processor'")

    def refuse_video(*args, **kwargs):
        raise ImportError("SmolVLMVideoProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(transformers.SmolVLMProcessor, "from_args_and_dict", classmethod(needs_video))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse_video)
    out = tmp_path / "out.dowser.safetensors"
    r = run(["probe", folder, "--images", "--probes", 2, "--probe-len", 4, "--out", out])
    assert_clean_failure(r, out, str(folder), "SmolVLMProcessor", "video_processor")


def test_processor_folder_that_does_not_load_is_one_line(tmp_path):
    """A Gemma 3 folder whose processor files are broken (its tokenizer is gone)."""
    folder = build("gemma3", tmp_path / "gemma3")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "tokenizer", ignore_errors=True)
    out = tmp_path / "out.dowser.safetensors"
    r = run(["probe", folder, "--images", "--probes", 2, "--probe-len", 4, "--out", out])
    assert_clean_failure(r, out, str(folder), "processor")


def test_ovis2_with_images_streamed_equals_oracle(ovis2):
    """Ovis2's visual-vocabulary table and indicator tokens, streamed: equal to the in-memory oracle."""
    from transformers import AutoModelForImageTextToText

    from dowser_tool.probe.run import ProbeRun

    from .oracle import assert_run_matches_oracle

    settings = ProbeSettings(probes=4, probe_len=10, batch_size=2, draws=2, images=True, resident="never",
                             include=("lm_head", "vision", "projector"))
    run = ProbeRun(open_checkpoint(ovis2), settings, progress=False)
    rec = run.collect()
    assert {"decoder", "vision", "projector"} <= {w.part for w in run.weights}
    model = AutoModelForImageTextToText.from_pretrained(ovis2, dtype=torch.float32).eval()
    assert_run_matches_oracle(run, rec, ovis2, rtol=1e-5, model=model)
