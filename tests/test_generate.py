"""Generation: prompt reading through the carried state, sampling, stop strings, streaming, saved states, options."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import longctx.sampling as gen
from longctx import build_model
from longctx.checkpoint import load_state, save_state
from longctx.config import Config, ModelConfig, TransformerConfig
from longctx.errors import CheckpointError, ConfigError
from longctx.model import LongContextLM
from longctx.sampling import (
    PromptResult,
    SamplingOptions,
    apply_repetition_penalty,
    filter_logits,
    read_prompt,
    sample,
)
from longctx.tokenizer import Tokenizer

WINDOW = 8
PROMPT = "The quick brown fox jumps over the lazy dog; then it naps for a while."  # 70 bytes: many windows


def model_config(window: int = WINDOW) -> ModelConfig:
    return ModelConfig(
        n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=257, transformer=TransformerConfig(window=window)
    )


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def model() -> LongContextLM:
    torch.manual_seed(0)
    m = build_model(model_config())
    # a larger init than the default makes the logits far from uniform: greedy ties are impossible in practice
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m.eval()


def chunks_of(tokenizer: Tokenizer, text: str, size: int = 1 << 20) -> Iterator[np.ndarray]:
    for ids, _ in tokenizer.iter_encode(io.BytesIO(text.encode()), chunk_bytes=size):
        yield ids


def read(model: LongContextLM, tokenizer: Tokenizer, text: str = PROMPT, seq_len: int = 16, **kw) -> PromptResult:
    return read_prompt(model, tokenizer, chunks_of(tokenizer, text, kw.pop("chunk_bytes", 1 << 20)), seq_len, **kw)


def next_logits(model: LongContextLM, prompt: PromptResult) -> torch.Tensor:
    with torch.inference_mode():
        last = torch.tensor([[prompt.saved.last_token]])
        return model(last, prompt.saved.state).logits[0, -1].float()


def greedy(max_new_tokens: int = 12, **kw) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, **kw)


class Scripted:
    """Replaces the sampler: returns the given token ids in order, whatever the logits."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = iter(ids)

    def __call__(self, logits, opts, recent, generator) -> int:
        return next(self.ids)


# --------------------------------------------------------------------------------------------------------------------
# correctness against a brute-force recomputation


@pytest.mark.parametrize("seq_len", [1, 3, 8, 64])
def test_greedy_equals_full_recompute(model: LongContextLM, tokenizer: Tokenizer, seq_len: int) -> None:
    prompt_ids = tokenizer.encode_text(PROMPT).tolist()
    assert len(prompt_ids) > 5 * WINDOW
    n = 12
    result = sample(model, tokenizer, read(model, tokenizer, seq_len=seq_len), greedy(n))
    expected: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            stream = torch.tensor([[tokenizer.sep_id, *prompt_ids, *expected]])
            logits = model(stream, model.init_state(1)).logits[0, -1]
            expected.append(int(torch.argmax(logits)))
    assert result.tokens == expected
    assert result.stop_reason == "length"
    assert result.text == tokenizer.decode(expected)


def test_prompt_segmentation_does_not_change_next_logits(model: LongContextLM, tokenizer: Tokenizer) -> None:
    reference = read(model, tokenizer, seq_len=len(PROMPT) + 5)
    assert reference.prompt_tokens == len(PROMPT)
    assert reference.saved.tokens == len(PROMPT)  # SEP + prompt, minus the pending last token
    assert reference.saved.last_token == PROMPT.encode()[-1]
    expected = next_logits(model, reference)
    for seq_len, chunk_bytes in [(1, 1 << 20), (5, 7), (8, 3), (16, 1), (70, 70)]:
        other = read(model, tokenizer, seq_len=seq_len, chunk_bytes=chunk_bytes)
        assert other.saved.tokens == reference.saved.tokens
        assert other.saved.last_token == reference.saved.last_token
        torch.testing.assert_close(next_logits(model, other), expected, atol=1e-5, rtol=0)


def test_read_prompt_keeps_a_bounded_history(model: LongContextLM, tokenizer: Tokenizer) -> None:
    result = read(model, tokenizer, seq_len=4, chunk_bytes=5, keep_recent=10)
    assert result.recent == list(PROMPT.encode()[-10:])
    empty = read_prompt(model, tokenizer, [], seq_len=4)
    assert (empty.prompt_tokens, empty.saved.tokens, empty.saved.last_token) == (0, 0, tokenizer.sep_id)
    assert empty.recent == []


def test_read_prompt_progress_counts_the_tokens_read(model: LongContextLM, tokenizer: Tokenizer, monkeypatch) -> None:
    seen: dict[str, object] = {}

    class Recorder:
        def __init__(self, **kwargs: object) -> None:
            seen.update(kwargs, total=0)

        def update(self, n: int) -> None:
            seen["total"] = int(seen["total"]) + n  # type: ignore[call-overload]

        def __enter__(self) -> Recorder:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(gen, "tqdm", Recorder)
    result = read(model, tokenizer, "x" * 40, seq_len=8, progress=True)
    assert seen["disable"] is False and seen["delay"] == 1.0  # shown once reading takes over a second
    assert seen["total"] == 40  # SEP + 40 bytes: five whole segments of 8 fed, the last token pending
    assert result.saved.tokens == 40


def test_read_prompt_continues_from_a_state(model: LongContextLM, tokenizer: Tokenizer) -> None:
    whole = read(model, tokenizer)
    cut = 31
    first = read(model, tokenizer, PROMPT[:cut], seq_len=5)
    second = read(model, tokenizer, PROMPT[cut:], seq_len=7, start=first.saved)
    assert second.saved.tokens == whole.saved.tokens
    assert second.prompt_tokens == len(PROMPT) - cut
    torch.testing.assert_close(next_logits(model, second), next_logits(model, whole), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# seeds and sampling filters


def test_seeds_are_reproducible(model: LongContextLM, tokenizer: Tokenizer) -> None:
    prompt = read(model, tokenizer)
    opts = SamplingOptions(max_new_tokens=20, temperature=1.0, top_k=0, seed=7, ignore_eos=True)
    a = sample(model, tokenizer, prompt, opts)
    b = sample(model, tokenizer, prompt, opts)  # the prompt state is not changed by sampling
    assert a.tokens == b.tokens and a.text == b.text
    assert sample(model, tokenizer, prompt, opts, sample_index=1).tokens != a.tokens
    other = SamplingOptions(max_new_tokens=20, temperature=1.0, top_k=0, seed=8, ignore_eos=True)
    assert sample(model, tokenizer, prompt, other).tokens != a.tokens
    # seed + sample_index is the seed: sample 1 of seed 7 is sample 0 of seed 8
    shifted = sample(model, tokenizer, prompt, opts, sample_index=1)
    assert shifted.tokens == sample(model, tokenizer, prompt, other).tokens


@pytest.mark.parametrize(
    "filters",
    [{"top_k": 1}, {"top_p": 1e-6, "top_k": 0}, {"min_p": 0.999999, "top_k": 0}],
    ids=["top_k=1", "top_p tiny", "min_p ~1"],
)
def test_degenerate_filters_equal_greedy(model: LongContextLM, tokenizer: Tokenizer, filters: dict) -> None:
    prompt = read(model, tokenizer)
    expected = sample(model, tokenizer, prompt, greedy(15)).tokens
    for seed in range(3):
        opts = SamplingOptions(max_new_tokens=15, temperature=1.0, seed=seed, ignore_eos=True, **filters)
        assert sample(model, tokenizer, prompt, opts).tokens == expected


def test_repetition_penalty_direction() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 1.0, 0.5]))
    assert logits[0] == 2.0  # the input is not modified
    before, after = torch.softmax(logits, -1), torch.softmax(out, -1)
    assert after[0] < before[0] and after[1] < before[1]  # repeated tokens became less likely
    assert after[2] > before[2] and after[3] > before[3]
    assert torch.equal(apply_repetition_penalty(logits, [0, 1], 1.0), logits)
    assert torch.equal(apply_repetition_penalty(logits, [], 2.0), logits)


def test_filter_logits_by_hand() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda out: torch.isfinite(out).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.8)) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, min_p=0.5)) == [True, True, False, False]  # >= 0.25
    assert kept(filter_logits(logits)) == [True, True, True, True]


def test_repetition_penalty_in_sampling(model: LongContextLM, tokenizer: Tokenizer) -> None:
    prompt = read(model, tokenizer)
    plain = sample(model, tokenizer, prompt, greedy(30))
    penalised = sample(model, tokenizer, prompt, greedy(30, repetition_penalty=1e6, repeat_last_n=64))
    assert plain.tokens != penalised.tokens
    stream = prompt.recent + penalised.tokens
    start = len(prompt.recent)
    for i, token in enumerate(penalised.tokens):  # a huge penalty avoids the last 64 tokens
        assert token not in stream[start + i - 64 : start + i]


# --------------------------------------------------------------------------------------------------------------------
# stopping and streaming


def run_scripted(model, tokenizer, monkeypatch, ids: list[int], **kw) -> tuple[gen.SampleResult, list[str]]:
    monkeypatch.setattr(gen, "next_token", Scripted(ids))
    pieces: list[str] = []
    opts = SamplingOptions(**{"max_new_tokens": len(ids), **kw})
    result = sample(model, tokenizer, read(model, tokenizer, "x"), opts, on_text=pieces.append)
    return result, pieces


def test_stop_string_spanning_tokens(model, tokenizer, monkeypatch) -> None:
    ids = list(b"Hello, world. END of text")
    result, pieces = run_scripted(model, tokenizer, monkeypatch, ids, stop=["END", "zz"])
    assert result.stop_reason == "stop"
    assert result.text == "Hello, world. "
    assert "".join(pieces) == result.text
    assert not any("E" in p for p in pieces)  # the start of the stop string was held back, never printed
    assert result.tokens == ids[: ids.index(ord("D")) + 1]  # sampling ended on the stop string's last token


def test_partial_stop_prefix_is_released(model, tokenizer, monkeypatch) -> None:
    ids = list(b"an ENd, an EN")
    result, pieces = run_scripted(model, tokenizer, monkeypatch, ids, stop=["END"])
    assert result.stop_reason == "length"
    assert result.text == "an ENd, an EN" == "".join(pieces)


def test_stop_string_with_multibyte_characters(model, tokenizer, monkeypatch) -> None:
    ids = list("ça va → fin →→ après".encode())
    result, pieces = run_scripted(model, tokenizer, monkeypatch, ids, stop=["→→"])
    assert result.stop_reason == "stop"
    assert result.text == "ça va → fin " == "".join(pieces)


def test_streaming_never_splits_utf8(model, tokenizer, monkeypatch) -> None:
    text = "a€😀é"
    ids = list(text.encode())
    result, pieces = run_scripted(model, tokenizer, monkeypatch, ids)
    assert result.stop_reason == "length"
    assert result.text == text == "".join(pieces)
    assert "\ufffd" not in "".join(pieces)
    assert pieces == ["a", "€", "😀", "é"]  # one piece per complete character


def test_truncated_character_at_the_end(model, tokenizer, monkeypatch) -> None:
    ids = list("ok😀".encode())[:-1]  # max_new_tokens cuts the emoji
    result, pieces = run_scripted(model, tokenizer, monkeypatch, ids)
    assert result.text == "ok\ufffd" == "".join(pieces)


def test_separator_ends_a_sample_unless_ignore_eos(model, tokenizer, monkeypatch) -> None:
    sep = tokenizer.sep_id
    ids = [*b"ab", sep, *b"cd"]
    result, _ = run_scripted(model, tokenizer, monkeypatch, ids)
    assert (result.stop_reason, result.text, result.tokens) == ("eos", "ab", list(b"ab"))
    assert result.saved is not None and result.saved.last_token == sep
    result, _ = run_scripted(model, tokenizer, monkeypatch, ids, ignore_eos=True)
    assert (result.stop_reason, result.text, result.tokens) == ("length", "abcd", ids)


def test_zero_new_tokens(model: LongContextLM, tokenizer: Tokenizer) -> None:
    prompt = read(model, tokenizer)
    result = sample(model, tokenizer, prompt, SamplingOptions(max_new_tokens=0))
    assert (result.text, result.tokens, result.stop_reason) == ("", [], "length")


def test_sample_state_continues_the_stream(model: LongContextLM, tokenizer: Tokenizer) -> None:
    prompt = read(model, tokenizer)
    first = sample(model, tokenizer, prompt, greedy(10))
    both = sample(model, tokenizer, prompt, greedy(16))
    assert first.saved is not None and first.saved.tokens == prompt.saved.tokens + 10
    rest = sample(model, tokenizer, PromptResult(first.saved, 0, 0.0, []), greedy(6))
    assert first.tokens + rest.tokens == both.tokens


# --------------------------------------------------------------------------------------------------------------------
# saved states


def test_saved_state_round_trip(model: LongContextLM, tokenizer: Tokenizer, tmp_path) -> None:
    config = Config(model=model_config())
    prompt = read(model, tokenizer)
    path = tmp_path / "state.safetensors"
    save_state(path, prompt.saved, config, tokenizer)
    loaded = load_state(path, model, config, tokenizer)
    assert (loaded.tokens, loaded.last_token) == (prompt.saved.tokens, prompt.saved.last_token)
    reloaded = PromptResult(saved=loaded, prompt_tokens=0, elapsed_s=0.0, recent=prompt.recent)
    opts = SamplingOptions(max_new_tokens=20, temperature=1.0, seed=3, ignore_eos=True)
    assert sample(model, tokenizer, reloaded, opts).tokens == sample(model, tokenizer, prompt, opts).tokens
    # a prompt read on top of the loaded state equals one read in a single pass
    more = read(model, tokenizer, " And more.", start=loaded)
    whole = read(model, tokenizer, PROMPT + " And more.")
    torch.testing.assert_close(next_logits(model, more), next_logits(model, whole), atol=1e-5, rtol=0)

    other_cfg = model_config(window=4)
    other = build_model(other_cfg).eval()
    with pytest.raises(CheckpointError, match="different model"):
        load_state(path, other, Config(model=other_cfg), tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# options and robustness


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"temperature": -1}, "--temperature must be a number >= 0 (0 = greedy), got -1"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"top_p": 1.5}, "--top-p must be a number in (0, 1]"),
        ({"top_p": 0.0}, "--top-p must be a number in (0, 1]"),
        ({"min_p": 1.0}, "--min-p must be a number in [0, 1)"),
        ({"min_p": -0.1}, "--min-p must be a number in [0, 1)"),
        ({"top_k": -1}, "--top-k must be an integer >= 0"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty must be a number > 0"),
        ({"max_new_tokens": -5}, "--max-new-tokens must be an integer >= 0, got -5"),
        ({"repeat_last_n": -1}, "--repeat-last-n must be an integer >= 0"),
        ({"seed": -1}, "--seed must be an integer >= 0"),
        ({"top_k": 2.5}, "--top-k must be an integer"),
        ({"stop": [""]}, "--stop must be a non-empty string"),
    ],
)
def test_option_validation(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        SamplingOptions(**kw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_arguments(model: LongContextLM, tokenizer: Tokenizer) -> None:
    with pytest.raises(ConfigError, match="--seq-len"):
        read(model, tokenizer, seq_len=0)
    with pytest.raises(ConfigError, match="--precision"):
        read(model, tokenizer, precision="fp8")
    with pytest.raises(gen.DataError, match="vocabulary"):
        read_prompt(model, tokenizer, [np.array([1, 300])], seq_len=4)
    assert SamplingOptions(stop="END").stop == ["END"]


def test_train_mode_is_restored_and_ignored(tokenizer: Tokenizer) -> None:
    torch.manual_seed(0)
    cfg = model_config()
    cfg.dropout = 0.5
    m = build_model(cfg).train()
    opts = SamplingOptions(max_new_tokens=8, temperature=1.0, seed=1, ignore_eos=True)
    a = sample(m, tokenizer, read(m, tokenizer), opts)
    assert m.training
    b = sample(m, tokenizer, read(m, tokenizer), opts)
    assert a.tokens == b.tokens  # dropout is off while generating


def test_bf16_runs(model: LongContextLM, tokenizer: Tokenizer) -> None:
    prompt = read(model, tokenizer, precision="bf16")
    result = sample(model, tokenizer, prompt, greedy(5), precision="bf16")
    assert len(result.tokens) == 5
    assert prompt.saved.state.tensors()["keys"].dtype == torch.float32  # the state keeps the model's dtype
