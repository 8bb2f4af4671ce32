"""Sampling numerics (unclip.sampling_numerics): chosen once per model by a probe or the
cache, honoured when fixed, and never used where a decode must be exact."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import make_tiny_bundle
from unclip import numerics, sampling_numerics
from unclip.config import ConfigError, SamplingSettings
from unclip.pipeline import (
    UnclipPipeline,
    encode_prompts,
    image_seeds,
    sample_decoder,
    sample_upsampler,
)


def _n(amp: str, fmt: str) -> numerics.Numerics:
    """A setting at this process's current thread count (an earlier test may change it)."""
    return numerics.Numerics(amp, fmt, torch.get_num_threads())  # type: ignore[arg-type]


def test_the_override_is_parsed_and_a_bad_one_names_the_variable(monkeypatch) -> None:
    for raw, want in [
        ("auto", ("auto", "auto")),
        ("fp32", ("none", "contiguous")),
        ("BF16/channels_last", ("bf16", "channels_last")),
    ]:
        monkeypatch.setenv(sampling_numerics.ENV, raw)
        assert sampling_numerics.requested() == want
    monkeypatch.setenv(sampling_numerics.ENV, "fp8")
    with pytest.raises(ConfigError, match="UNCLIP_SAMPLING_NUMERICS='fp8'.*bf16/channels_last"):
        sampling_numerics.requested()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> UnclipPipeline:
    return UnclipPipeline.from_bundle(make_tiny_bundle(str(tmp_path_factory.mktemp("b"))))


def _fresh(pipe: UnclipPipeline) -> UnclipPipeline:
    """The bundle's models again, with nothing chosen yet."""
    import copy

    return copy.deepcopy(pipe)


def _layout_is(model: torch.nn.Module, fmt: str) -> bool:
    weights = [w for w in model.parameters() if w.dim() == 4 and w.shape[-1] > 1]
    cl = [w.is_contiguous(memory_format=torch.channels_last) for w in weights]
    return bool(weights) and all(cl) == (fmt == "channels_last") and any(cl) == all(cl)


def test_auto_probes_copies_then_applies_the_winner_once(pipe, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(sampling_numerics.ENV, "auto")
    p = _fresh(pipe)
    before = {k: v.clone() for k, v in p.decoder.state_dict().items()}
    seen: list[torch.nn.Module] = []
    emb = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)

    def call(m: torch.nn.Module, rows: torch.Tensor) -> None:
        seen.append(m)
        assert rows.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]  # a fixed-size batch from 3 rows
        m.sample(emb[rows], steps=1)

    cache = numerics.NumericsCache(str(tmp_path / "n.json"))
    got = sampling_numerics.ensure(p.decoder, call, 3, cache)
    assert seen and all(m is not p.decoder for m in seen)  # timed on copies
    assert len({id(m) for m in seen}) == 4  # fp32 / bf16 x contiguous / channels-last
    assert sampling_numerics.chosen(p.decoder) == got
    for k, v in p.decoder.state_dict().items():  # the same numbers, in the chosen layout
        torch.testing.assert_close(v, before[k])
    assert _layout_is(p.decoder, got.memory_format)
    calls = len(seen)
    assert sampling_numerics.ensure(p.decoder, call, 3, cache) == got
    assert len(seen) == calls  # chosen once per model


def test_a_cached_choice_is_applied_without_timing(pipe, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(sampling_numerics.ENV, "auto")
    p = _fresh(pipe)
    up = p.upsamplers[0]
    cache = numerics.NumericsCache(str(tmp_path / "n.json"))
    # what a probe by another process on this machine left behind
    cache.put(
        sampling_numerics.workload(up),
        numerics.Choice(
            _n("bf16", "channels_last"),
            {
                _n("bf16", "channels_last"): 0.1,
                _n("none", "contiguous"): 0.3,
                _n("bf16", "contiguous"): 0.2,
                _n("none", "channels_last"): 0.25,
            },
            "probe",
        ),
    )

    def never(m: torch.nn.Module, rows: torch.Tensor) -> None:
        raise AssertionError("a cached choice must not be timed")

    assert sampling_numerics.ensure(up, never, 1, cache) == _n("bf16", "channels_last")
    assert _layout_is(up, "channels_last")


def test_fixed_numerics_are_honoured_and_exact_decodes_stay_fp32(pipe, monkeypatch) -> None:
    s = SamplingSettings(decoder_steps=4, upsampler_steps=2, decoder_guidance_scale=2.0)
    seeds = image_seeds(0, 2)
    text = encode_prompts(pipe.clip, ["a red circle", "a blue square"], pipe.with_states)
    emb = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator()), dim=-1)
    x_T = torch.randn(2, *pipe.decoder.image_shape, generator=torch.Generator().manual_seed(1))
    out = {}
    for setting in ("fp32", "bf16/channels_last"):
        monkeypatch.setenv(sampling_numerics.ENV, setting)
        p = _fresh(pipe)
        conv = next(m for m in p.decoder.modules() if isinstance(m, torch.nn.Conv2d))
        dtypes: list[torch.dtype] = []
        conv.register_forward_hook(lambda m, i, o, seen=dtypes: seen.append(o.dtype))
        fresh = sample_decoder(p.decoder, emb, text, seeds, s)
        fresh_dtypes, dtypes[:] = set(dtypes), []
        exact = sample_decoder(p.decoder, emb, text, seeds, s, noise=x_T)
        out[setting] = (fresh, exact, fresh_dtypes, set(dtypes))
        want = _n("none", "contiguous") if setting == "fp32" else _n("bf16", "channels_last")
        assert sampling_numerics.chosen(p.decoder) == want
        up = sample_upsampler(p.upsamplers[0], torch.zeros(2, 3, 16, 16), seeds, s)
        assert up.dtype == fresh.dtype == torch.float32  # callers always get fp32 pixels
    fp32, bf16 = out["fp32"], out["bf16/channels_last"]
    assert fp32[2] == {torch.float32} and bf16[2] == {torch.bfloat16}
    # a fixed x_T (an inverted latent) decodes in fp32 whatever was chosen: the same pixels
    assert bf16[3] == {torch.float32}
    torch.testing.assert_close(fp32[1], bf16[1], rtol=1e-4, atol=1e-4)
