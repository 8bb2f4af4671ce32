"""The numerics a UNet stage samples with, measured on the machine like training's.

On a 2-core Xeon with AMX, bf16 autocast with channels-last made the quick bundle's decoder
sampling 1.9x and its upsampler's 3.0x faster than fp32 (``bench/bench_inference.py``);
without AMX bf16 is slower than fp32. So the first sampling call of a decoder or upsampler
times a short call (2 steps, ``PROBE_ROWS`` rows made from the call's own inputs) under each
candidate setting and keeps the fastest (``numerics.choose``, cached per machine and stage
config, so every later process on the machine, library, CLI, eval or Serve, takes the same
choice without timing).

Override with the environment variable ``UNCLIP_SAMPLING_NUMERICS``: ``auto`` (default),
``fp32``, ``bf16``, ``fp32/channels_last`` or ``bf16/channels_last``.

Decoding a fixed x_T (an inverted latent: reconstructions and eta-0 variations) always runs
in fp32, like DDIM inversion itself: bf16 moves the trajectory by up to ~0.3 in pixel value,
which a reconstruction cannot afford. The prior is small and gains little (1.17x): fp32.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from unclip import numerics
from unclip.config import ConfigError, to_dict

ENV = "UNCLIP_SAMPLING_NUMERICS"
PROBE_ROWS = 8  # a fixed probe batch: the choice must not depend on who calls first
_ATTR = "_sampling_numerics"


def requested(value: str | None = None) -> tuple[str, str]:
    """(amp, memory format) from ``UNCLIP_SAMPLING_NUMERICS`` (each ``auto`` if unset)."""
    raw = (os.environ.get(ENV, "auto") if value is None else value).strip().lower()
    if raw in ("", "auto"):
        return numerics.AUTO, numerics.AUTO
    amp, _, fmt = raw.partition("/")
    amp = {"fp32": "none"}.get(amp, amp)
    try:
        numerics.parse_choice("amp", amp, numerics.AMPS)
        numerics.parse_choice("memory_format", fmt or "contiguous", numerics.MEMORY_FORMATS)
    except ConfigError as e:
        raise ConfigError(
            f"{ENV}={raw!r}: {e}; use auto, fp32, bf16, fp32/channels_last or bf16/channels_last"
        ) from None
    return amp, fmt or "contiguous"


def workload(model: nn.Module) -> str:
    """The cache key of a model's sampling probe: its class, config and device, not the
    caller's batch (every caller on a machine takes the same choice)."""
    device = next(model.parameters()).device
    return numerics.workload_key(
        "sampling", type(model).__name__, to_dict(model.config), device.type, PROBE_ROWS
    )


def chosen(model: nn.Module) -> numerics.Numerics | None:
    """The setting ``ensure`` chose for ``model`` (None before its first sampling call)."""
    return getattr(model, _ATTR, None)


def ensure(
    model: nn.Module,
    call: Callable[[nn.Module, torch.Tensor], object],
    rows: int,
    cache: numerics.NumericsCache | None = None,
) -> numerics.Numerics:
    """Choose ``model``'s sampling numerics once (probe or cache) and apply its memory format.

    ``call(m, index)`` runs a 2-step sampling call of ``m`` on the rows ``index`` (a LongTensor
    of ``PROBE_ROWS`` indices into the caller's ``rows`` inputs)."""
    got = chosen(model)
    if got is not None:
        return got
    device = next(model.parameters()).device
    amp, fmt = requested()
    options = numerics.candidates(device, torch.get_num_threads(), amp, fmt)
    index = torch.arange(PROBE_ROWS) % max(1, rows)
    copies: dict[numerics.Numerics, nn.Module] = {}

    def step(n: numerics.Numerics) -> None:
        if n not in copies:  # probe on copies: the model itself changes layout only once
            copies[n] = n.apply(copy.deepcopy(model))
        with torch.no_grad(), n.autocast(device.type):
            call(copies[n], index)

    choice = numerics.choose(
        step,
        options,
        workload(model),
        cache if cache is not None else numerics.NumericsCache(),
        min_seconds=0.5,
    )
    choice.numerics.apply(model)
    setattr(model, _ATTR, choice.numerics)
    return choice.numerics


@contextmanager
def running(model: nn.Module, exact: bool = False) -> Iterator[None]:
    """The autocast of ``model``'s chosen setting around a sampling call (fp32 if ``exact``
    or nothing was chosen)."""
    n = chosen(model)
    device = next(model.parameters()).device
    with nullcontext() if exact or n is None else n.autocast(device.type):
        yield
