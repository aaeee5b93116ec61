"""Encoder-decoder probes (issue 21, "the decoder is the decoder"): for Florence-2's BART the probe text is the
encoder's input and, shifted right behind the decoder start token, the decoder's, so the scored decoder layers run
over the probe's length; probes are generated without a KV cache, one full forward per step, the next token sampled
from the decoder's last position. Decoder-only models are untouched (their inputs are input_ids alone)."""

import pytest
import torch

from dowser_tool import open_checkpoint
from dowser_tool.model.streaming import BlockRunner
from dowser_tool.probe.prompts import (Sampling, _step_logits, decoder_start_id, generate_text_probes,
                                       placeholder_token_ids, random_prefixes, sample_next, special_token_ids)
from dowser_tool.probe.run import ProbeRun, ProbeSettings

from .families import build

PROBES, LENGTH, SEED = 4, 10, 3
GREEDY = Sampling(temperature=1e-6, top_p=0.9, repetition_penalty=1.0)  # the sample is the argmax


@pytest.fixture(scope="module")
def florence2(tmp_path_factory):
    return build("florence2", tmp_path_factory.mktemp("florence2") / "florence2")


@pytest.fixture(scope="module")
def in_memory(florence2):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(florence2, dtype=torch.float32).eval()


def runner_for(folder, residency):
    return BlockRunner(open_checkpoint(folder), torch.device("cpu"), torch.float32, residency=residency)


def bart_shift(ids, model):
    """transformers' own decoder inputs for target ids (BART's shift_tokens_right)."""
    from transformers.models.bart.modeling_bart import shift_tokens_right

    cfg = model.config.text_config
    return shift_tokens_right(ids, cfg.pad_token_id, cfg.decoder_start_token_id)


def prefixes_of(runner, sampling, seed):
    """The random prefixes generate_text_probes draws (same generator, same order), and the generator after them."""
    config = runner.ckpt.config
    text_cfg = runner.anatomy.text_config.to_dict()
    bos, special = special_token_ids(runner.ckpt, text_cfg, config)
    placeholders = placeholder_token_ids(runner.ckpt, config) - {bos}
    gen = torch.Generator().manual_seed(seed)
    rows = random_prefixes(PROBES, int(text_cfg["vocab_size"]), bos, special | placeholders, sampling, gen)
    return rows, placeholders, gen


def test_decoder_start_is_found_for_the_encoder_decoder_only(florence2, llama_dir):
    runner = runner_for(florence2, "auto")
    assert runner.anatomy.text_config.is_encoder_decoder
    assert decoder_start_id(runner) == runner.anatomy.text_config.decoder_start_token_id == 2  # BART's </s>
    assert decoder_start_id(runner_for(llama_dir, "auto")) is None
    run = ProbeRun(open_checkpoint(llama_dir), ProbeSettings(probes=2, probe_len=6, batch_size=2), progress=False)
    run.tokens = torch.arange(12).view(2, 6)
    assert run.decoder_start is None and set(run._inputs(slice(0, 2))) == {"input_ids", "use_cache"}


@pytest.mark.parametrize("resident", ["auto", "never"])
def test_statistics_pass_runs_the_decoder_over_the_probe(florence2, in_memory, resident):
    settings = ProbeSettings(probes=PROBES, probe_len=LENGTH, batch_size=2, draws=2, seed=SEED, resident=resident)
    run = ProbeRun(open_checkpoint(florence2), settings, progress=False)
    run.tokens = tokens = run.make_tokens()
    run.make_tokens = lambda: tokens  # collect() below takes these, without generating again
    inputs = run._inputs(slice(0, 2))
    ids = run.tokens[0:2]
    assert torch.equal(inputs["input_ids"], ids)  # the encoder reads the probe
    assert torch.equal(inputs["decoder_input_ids"], bart_shift(ids, in_memory))  # the decoder: it shifted right
    assert inputs["decoder_input_ids"][:, 0].tolist() == [2, 2]
    assert torch.equal(inputs["decoder_input_ids"][:, 1:], ids[:, :-1])

    lengths = []  # sequence length of every computation of the first decoder layer during the statistics

    def record(mod, args, kwargs):
        if "forward" not in mod.__dict__:  # not a stub of the call capture or the head (those compute nothing)
            lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    hook = run.runner.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        run.collect()
    finally:
        hook.remove()
    assert len(lengths) >= 2 * 2 and set(lengths) == {LENGTH}  # 2 batches, forward and reverse

    # the last-position logits of a pass are the decoder's, as the model in memory computes them
    with torch.no_grad():
        want = in_memory(**{k: v for k, v in inputs.items()}).logits[:, -1, :]
        cap = run.runner.capture(**inputs)
        assert tuple(cap.hidden.shape) == (2, LENGTH, in_memory.config.text_config.d_model)
        h = cap.hidden
        for i, layer in run.runner.stream(range(len(run.runner.layers))):
            h = cap.call(i, layer, h, run.runner.tuple_out)
        got = run.runner.head_logits(h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generated_probes_are_the_greedy_continuation_of_their_prefix(florence2, in_memory):
    runs = {res: generate_text_probes(runner_for(florence2, res), PROBES, LENGTH, SEED, GREEDY)
            for res in ("auto", "never")}  # one forward per step with every layer loaded / streamed layers
    assert runs["auto"].shape == (PROBES, LENGTH)
    assert torch.equal(runs["auto"], runs["never"])
    tokens = runs["auto"]
    prefixes, placeholders, _ = prefixes_of(runner_for(florence2, "auto"), GREEDY, SEED)
    continued = 0
    with torch.no_grad():
        for t in range(LENGTH - 1):
            logits = in_memory(input_ids=tokens[:, : t + 1], decoder_input_ids=bart_shift(tokens[:, : t + 2],
                                                                                          in_memory)).logits[:, -1, :]
            logits[:, sorted(placeholders)] = -float("inf")
            for r, p in enumerate(prefixes):
                if t + 1 < len(p):
                    assert tokens[r, t + 1] == p[t + 1]  # still inside its random prefix
                else:
                    assert tokens[r, t + 1] == int(logits[r].argmax()), (r, t)
                    continued += 1
    assert continued >= PROBES * (LENGTH - 6)  # prefixes hold at most BOS + 5 tokens


def test_generated_probes_sample_the_in_memory_decoder(florence2, in_memory):
    sampling = Sampling()
    first = generate_text_probes(runner_for(florence2, "never"), PROBES, LENGTH, SEED, sampling)
    assert torch.equal(first, generate_text_probes(runner_for(florence2, "auto"), PROBES, LENGTH, SEED, sampling))
    assert not torch.equal(first, generate_text_probes(runner_for(florence2, "auto"), PROBES, LENGTH, SEED + 1,
                                                       sampling))
    # the same generation with the model in memory (the same draws from the same generator) gives the same tokens
    prefixes, placeholders, gen = prefixes_of(runner_for(florence2, "auto"), sampling, SEED)
    tokens = torch.full((PROBES, LENGTH), 0, dtype=torch.long)
    for r, p in enumerate(prefixes):
        tokens[r, : len(p)] = torch.tensor(p)
    streamed = runner_for(florence2, "never")
    with torch.no_grad():
        for t in range(LENGTH - 1):
            logits = in_memory(input_ids=tokens[:, : t + 1],
                               decoder_input_ids=bart_shift(tokens[:, : t + 2], in_memory)).logits[:, -1, :]
            if t == LENGTH // 2:  # one streamed step (every layer read in turn) gives the model's logits
                step = _step_logits(streamed, first, t, None, decoder_start_id(streamed))
                torch.testing.assert_close(step, logits, rtol=1e-5, atol=1e-5)
            sampled = sample_next(logits, tokens[:, : t + 1], sampling, gen, placeholders)
            for r, p in enumerate(prefixes):
                if t + 1 >= len(p):
                    tokens[r, t + 1] = sampled[r]
    assert torch.equal(tokens, first)
