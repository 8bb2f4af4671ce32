"""Numeric settings chosen by measuring, not by CPU flags: autocast dtype, memory format, threads.

Which settings are fastest depends on the machine, not on what its flags promise: on a
2-core Xeon with AMX, bf16 autocast made the decoder's training step 1.3x faster; on one
with AVX512-BF16 but no AMX the same step was 10-20% *slower* than fp32, and channels-last
helped there instead. So a stage times a handful of its own real steps under each candidate
setting (``probe``) and keeps the fastest (``pick``); the result is cached per machine and
workload (``NumericsCache``; a probe at another thread count still decides the dtype and
memory format), and any field can be fixed in the config instead.

    candidates  (amp, memory format, threads) combinations worth timing on this device
    probe       median seconds per step of ``step_fn`` under each candidate (a candidate far
                slower than the fastest in its first call is not timed again)
    pick        the fastest; a candidate must beat plain fp32 / contiguous / most threads by
                ``margin`` to be chosen (a tie keeps the most accurate, simplest setting)

Nothing here knows about stages or Ray: callers pass a step function.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from unclip.config import ConfigError, check_choice

Amp = Literal["none", "bf16", "fp16"]
MemoryFormat = Literal["contiguous", "channels_last"]
AMPS: tuple[str, ...] = ("none", "bf16", "fp16")
MEMORY_FORMATS: tuple[str, ...] = ("contiguous", "channels_last")
AUTO = "auto"
DEFAULT_MARGIN = 0.05  # a non-default setting must be >= 5% faster to be picked
BUSY_LIMIT = 0.3  # other processes' mean busy cores above which a probe is not cached
PRUNE_RATIO = 4.0  # an option whose warm-up is this many times the fastest's is not timed on,
PRUNE_MIN_S = 1.0  # if that warm-up also took this long (cheap calls are timed anyway)

StepFn = Callable[["Numerics"], None]


@dataclass(frozen=True, order=True)
class Numerics:
    """How a model runs: autocast dtype, memory format of 4-D activations, torch threads."""

    amp: Amp = "none"
    memory_format: MemoryFormat = "contiguous"
    threads: int = 1

    def __post_init__(self) -> None:
        check_choice("amp", self.amp, AMPS)
        check_choice("memory_format", self.memory_format, MEMORY_FORMATS)
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")

    @property
    def label(self) -> str:
        amp = "fp32" if self.amp == "none" else self.amp
        fmt = "channels_last" if self.memory_format == "channels_last" else "contiguous"
        return f"{amp}/{fmt}/{self.threads}t"

    def autocast(self, device_type: str) -> Any:
        """The autocast context of these settings (a no-op for fp32)."""
        if self.amp == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type, dtype=dtype)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Put ``model``'s parameters in this memory format (in place)."""
        if self.memory_format == "channels_last":
            model.to(memory_format=torch.channels_last)
        else:
            model.to(memory_format=torch.contiguous_format)
        return model

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch in this memory format (4-D tensors only)."""
        if x.dim() == 4 and self.memory_format == "channels_last":
            return x.contiguous(memory_format=torch.channels_last)
        return x


def parse_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """A config value that is one of ``choices`` or ``auto`` (measure)."""
    return check_choice(name, value, (AUTO, *choices))


# ---------------------------------------------------------------------- candidates
def cpu_bf16_runs(device: torch.device) -> bool:
    """Whether bf16 autocast works on this CPU at all (not whether it is fast)."""
    if device.type != "cpu":
        return True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except RuntimeError:  # pragma: no cover - torch builds without CPU bf16
        return False


def candidates(
    device: torch.device,
    threads: int,
    amp: str = AUTO,
    memory_format: str = AUTO,
    convolutional: bool = True,
) -> list[Numerics]:
    """(amp, memory format) settings worth timing at ``threads``; fixed fields (not
    ``auto``) are kept as given.

    CPU: fp32 and bf16 (fp16 autocast on CPU is emulated: never faster); contiguous and,
    for convolutional models, channels-last. GPU: bf16 where supported, else fp16; memory
    formats as on CPU. Fewer threads are tried afterwards by ``choose``.
    """
    parse_choice("amp", amp, AMPS)
    parse_choice("memory_format", memory_format, MEMORY_FORMATS)
    if amp != AUTO:
        amps = [amp]
    elif device.type == "cuda":
        amps = ["bf16" if torch.cuda.is_bf16_supported() else "fp16"]
    else:
        amps = ["none", "bf16"] if cpu_bf16_runs(device) else ["none"]
    if memory_format != AUTO:
        formats = [memory_format]
    else:
        formats = ["contiguous", "channels_last"] if convolutional else ["contiguous"]
    return [Numerics(a, f, threads) for a in amps for f in formats]  # type: ignore[arg-type]


# ---------------------------------------------------------------------- measuring
def probe(
    step_fn: StepFn,
    options: Sequence[Numerics],
    warmup: int = 2,
    repeats: int = 3,
    clock: Callable[[], float] = time.perf_counter,
    min_seconds: float = 0.0,
    max_repeats: int = 15,
    prune_ratio: float = PRUNE_RATIO,
    pruned: set[Numerics] | None = None,
) -> dict[Numerics, float]:
    """Median seconds per call of ``step_fn(numerics)`` for each option.

    ``warmup`` calls per option are not timed (kernel and allocator set-up); options are
    timed in interleaved rounds, so a passing load spike hits all of them alike. Short steps
    get more rounds (up to ``max_repeats``) until each option is timed for ``min_seconds``:
    three 0.07 s steps are too few to tell two settings apart. An option whose fastest
    warm-up call took more than ``prune_ratio`` times the fastest option's, and at least
    ``PRUNE_MIN_S`` (a first call carries kernel set-up that can exaggerate the ratio of
    short calls), is out of the race and is not called again: its warm-up time is its
    timing, and it is added to ``pruned`` (on a CPU without native bf16, a bf16 sampling
    call took 34 s against fp32's 0.36 s; timing it three more times made one probe last
    148 s). The reference setting (``default_of``) is always timed in full. Torch's RNG state and thread count are
    restored afterwards: probing changes no later result.
    """
    if not options:
        raise ValueError("nothing to probe: no candidate settings")
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    first: dict[Numerics, float] = {}
    times: dict[Numerics, list[float]] = {}
    try:
        for o in options:
            for _ in range(warmup):
                t = clock()
                step_fn(o)
                first[o] = min(first.get(o, math.inf), clock() - t)
        reference = default_of(options)
        fastest = min(first.values(), default=0.0)
        racing = [
            o
            for o in options
            if warmup < 1
            or o == reference
            or first[o] <= prune_ratio * fastest
            or first[o] < PRUNE_MIN_S
        ]
        slowest = max((first[o] for o in racing), default=0.0)
        if min_seconds > 0 and slowest > 0:
            repeats = max(repeats, min(max_repeats, math.ceil(min_seconds / slowest)))
        times = {o: [] for o in racing}
        for _ in range(repeats):
            for o in racing:
                t = clock()
                step_fn(o)
                times[o].append(clock() - t)
    finally:
        torch.set_rng_state(rng)
        torch.set_num_threads(threads)
    out = {}
    for o in options:
        if o in times:
            out[o] = statistics.median(times[o])
        else:
            out[o] = first[o]
            if pruned is not None:
                pruned.add(o)
    return out


def default_of(options: Sequence[Numerics]) -> Numerics:
    """The reference setting among ``options``: fp32 if present, contiguous, most threads."""
    return min(
        options,
        key=lambda o: (o.amp != "none", o.memory_format != "contiguous", -o.threads),
    )


def pick(timings: dict[Numerics, float], margin: float = DEFAULT_MARGIN) -> Numerics:
    """The fastest setting; it must beat the reference (``default_of``) by ``margin``
    (a fraction of the reference's time), else the reference is kept."""
    if not timings:
        raise ValueError("no timings to pick from")
    reference = default_of(list(timings))
    best = min(timings, key=lambda o: (timings[o], o))
    if timings[best] <= timings[reference] * (1.0 - margin):
        return best
    return reference


def describe(
    timings: dict[Numerics, float], chosen: Numerics, pruned: Collection[Numerics] = ()
) -> str:
    """One line: every candidate's time, the chosen one marked, relative to the reference;
    options timed by their warm-up call only (``probe``'s ``pruned``) say so."""
    ref = timings[default_of(list(timings))]
    parts = []
    for o in sorted(timings, key=lambda o: timings[o]):
        mark = "*" if o == chosen else ""
        note = ", warm-up only" if o in pruned else ""
        parts.append(f"{mark}{o.label} {timings[o]:.3f}s ({ref / timings[o]:.2f}x{note})")
    return ", ".join(parts)


def cpu_elsewhere(count_niced: bool = False) -> Callable[[], float]:
    """Start measuring the CPU that other processes use; the returned function gives their
    mean number of busy cores since the start (0.0 where /proc/stat cannot be read).

    A probe is only as good as the machine is quiet: a second process on a 2-core machine
    makes 2-thread steps look 2-3x slower than they are, and a choice made then would be
    cached for every later run."""

    def machine_busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # the "nice" column is left out: processes at a positive nice yield to ours
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        busy = user + system + irq + softirq + steal + (nice if count_niced else 0)
        return busy / os.sysconf("SC_CLK_TCK")

    t0, busy0, own0 = time.monotonic(), machine_busy_s(), time.process_time()

    def stop() -> float:
        busy1, wall = machine_busy_s(), time.monotonic() - t0
        if busy0 is None or busy1 is None or wall <= 0:
            return 0.0
        return max(0.0, (busy1 - busy0) - (time.process_time() - own0)) / wall

    return stop


# ---------------------------------------------------------------------- cache
PROBE_VERSION = 2  # bump when the probe or the pick changes what it would choose


def machine_key() -> str:
    """What makes timings comparable: CPU model and flags, core count, torch version."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].strip()
    except OSError:
        model = platform.processor()
    if torch.cuda.is_available():
        model += " | " + torch.cuda.get_device_name(0)
    flags_hash = hashlib.sha1(flags.encode()).hexdigest()[:12]
    # PROBE_VERSION: entries written by an older probe are measured again
    return f"{model}|{flags_hash}|{os.cpu_count()}|{torch.__version__}|v{PROBE_VERSION}"


def workload_key(*parts: Any) -> str:
    """A stable key of what is timed (e.g. the stage config and batch size)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def default_cache_path() -> str:
    root = os.environ.get("UNCLIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "unclip"
    )
    return os.path.join(root, "numerics.json")


class NumericsCache:
    """Probe results per (machine, workload) in one JSON file; a damaged file is ignored."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_cache_path()

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, workload: str) -> Choice | None:
        entry = self._read().get(machine_key(), {}).get(workload)
        if not entry:
            return None
        try:
            chosen = Numerics(**entry["chosen"])
            timings = {Numerics(**o): float(t) for o, t in entry["timings"]}
            threads = {Numerics(**o): float(t) for o, t in entry.get("thread_timings", [])}
            pruned = frozenset(Numerics(**o) for o in entry.get("pruned", []))
        except (KeyError, TypeError, ValueError):
            return None
        return Choice(chosen, timings, "cache", threads, pruned=pruned)

    def put(self, workload: str, choice: Choice) -> None:
        data = self._read()
        data.setdefault(machine_key(), {})[workload] = {
            "chosen": asdict(choice.numerics),
            "timings": [[asdict(o), t] for o, t in choice.timings.items()],
            "thread_timings": [[asdict(o), t] for o, t in choice.thread_timings.items()],
            "pruned": [asdict(o) for o in sorted(choice.pruned)],
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except OSError:  # a read-only home: measure again next time
            pass


@dataclass(frozen=True)
class Choice:
    """The outcome of ``choose``: the settings, where they came from, and the timings of
    each round: ``timings`` compares the candidates at full threads, ``thread_timings`` the
    winner against fewer threads (measured in rounds of their own: not comparable across)."""

    numerics: Numerics
    timings: dict[Numerics, float]
    source: Literal["probe", "cache", "fixed"]
    thread_timings: dict[Numerics, float] = field(default_factory=dict)
    busy_elsewhere: float = 0.0  # other processes' mean busy cores during the probe
    pruned: frozenset[Numerics] = frozenset()  # timed by their warm-up call only
    kept_threads: bool = False  # fewer threads timed faster, but on a busy machine: not taken

    def summary(self) -> str:
        if self.source == "fixed":
            return f"{self.numerics.label} (fixed by the config, not measured)"
        # round 1 ran at full threads: mark the candidate that won it
        won = [
            o for o in self.timings if replace(o, threads=self.numerics.threads) == self.numerics
        ]
        first = won[0] if won else self.numerics
        line = f"{self.numerics.label} ({self.source}: "
        line += describe(self.timings, first, self.pruned)
        if self.thread_timings:
            line += f"; threads: {describe(self.thread_timings, self.numerics, self.pruned)}"
        if self.kept_threads:
            line += "; fewer threads timed faster while other processes were busy: not taken"
        if self.busy_elsewhere > BUSY_LIMIT:
            line += (
                f"; other processes kept {self.busy_elsewhere:.2f} cores busy during the"
                " probe: the choice is used for this run only, not cached"
            )
        return line + ")"


def from_cache(hit: Choice, options: Sequence[Numerics], margin: float) -> Choice | None:
    """``hit``'s choice among ``options`` where ``hit`` timed every (dtype, memory format)
    of ``options``, possibly at another thread count; None if it did not.

    Which dtype and memory format win rarely depends on the thread count, while probing
    again costs up to a minute on CPUs where one candidate is emulated; so the cached
    winner among ``options``' kinds is kept, at no more threads than ``options`` allow
    (and no more than the cached choice took)."""
    kind = lambda o: (o.amp, o.memory_format)  # noqa: E731
    kinds = {kind(o) for o in options}
    timed = {o: t for o, t in hit.timings.items() if kind(o) in kinds}
    if kinds - {kind(o) for o in timed}:
        return None
    full = max(o.threads for o in options)
    if kind(hit.numerics) in kinds:
        best = replace(hit.numerics, threads=min(hit.numerics.threads, full))
    else:  # the cached winner is not allowed here; its thread choice was for another kind
        best = replace(pick(timed, margin), threads=full)
    return replace(hit, numerics=best, source="cache")


def choose(
    step_fn: StepFn,
    options: Sequence[Numerics],
    workload: str,
    cache: NumericsCache | None = None,
    fewer_threads: Sequence[int] = (),
    margin: float = DEFAULT_MARGIN,
    warmup: int = 1,
    repeats: int = 3,
    clock: Callable[[], float] = time.perf_counter,
    min_seconds: float = 1.0,
    meter: Callable[[], Callable[[], float]] = cpu_elsewhere,
) -> Choice:
    """Cached ``pick(probe(...))`` over ``options``, then the winner again at each of
    ``fewer_threads`` (a second, short round: threads rarely change which dtype wins).
    A single option with no thread alternatives is used as given, without timing. A probe
    during which other processes kept more than ``BUSY_LIMIT`` cores busy (``meter``) is
    used but not cached: the next run measures again. A cached probe of the same workload
    at another thread count (a Serve replica given 1 CPU after eval probed with 2) is
    reused for the dtype and memory format: see ``from_cache``."""
    options = list(dict.fromkeys(options))
    fewer = [t for t in dict.fromkeys(fewer_threads) if t >= 1]
    if len(options) == 1 and not fewer:
        return Choice(options[0], {}, "fixed")
    if cache is not None:
        hit = cache.get(workload)
        reused = from_cache(hit, options, margin) if hit is not None else None
        if reused is not None:
            return reused
    busy = meter()
    pruned: set[Numerics] = set()
    timings = probe(step_fn, options, warmup, repeats, clock, min_seconds, pruned=pruned)
    chosen = pick(timings, margin)
    alternatives = [replace(chosen, threads=t) for t in fewer if t != chosen.threads]
    thread_timings: dict[Numerics, float] = {}
    kept_threads = False
    if alternatives:
        # the winner re-measured in the same rounds as its alternatives: these numbers decide,
        # unless other processes were busy meanwhile: a process on another core slows every
        # thread count but penalises the most threads most (on 2 cores, 2 threads share one
        # core with it), so a busy round would trade the run's cores for a moment's contention
        # (seen: Ray still starting up beside the CLIP's probe, 1 thread chosen, 0.8 s/step
        # for the whole run against 0.5 at 2 threads)
        thread_busy = meter()
        thread_timings = probe(
            step_fn, [chosen, *alternatives], warmup, repeats, clock, min_seconds
        )
        fewer_won = pick(thread_timings, margin)
        kept_threads = fewer_won != chosen and thread_busy() > BUSY_LIMIT
        chosen = chosen if kept_threads else fewer_won
    choice = Choice(
        chosen, timings, "probe", thread_timings, busy(), frozenset(pruned), kept_threads
    )
    if cache is not None and choice.busy_elsewhere <= BUSY_LIMIT:
        cache.put(workload, choice)
    return choice


@contextmanager
def settings(n: Numerics, device_type: str = "cpu") -> Iterator[None]:
    """Run a block under ``n``'s autocast and thread count (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n.threads)
    try:
        with n.autocast(device_type):
            yield
    finally:
        torch.set_num_threads(before)
