"""`unclip demo`: the whole pipeline end to end on the embedded default.

On a local Ray started here: shapes dataset -> small CLIP -> embedding ETL -> prior,
decoder, upsampler -> bundle -> evaluation -> Serve + a real HTTP /v1/generate request ->
report. Each stage is the same `unclip` command a user would run (in-process, sharing the
local Ray), so the demo exercises the real code paths. A stage whose outputs are complete
(a marker written after it succeeded with the same command) is skipped on a re-run; when a
stage runs again, every later stage runs again too.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from unclip.errors import UserError

PROMPTS = (
    "a small red circle in the top left corner",
    "a large blue square in the centre",
    "a yellow triangle, small, bottom right, on black",
    "a big green cross at the top right on a white background",
)


@dataclass(frozen=True)
class DemoPreset:
    name: str
    shapes: int  # images in the dataset
    eval_n: int  # held-out captions evaluated
    eval_decoder_steps: int
    eval_upsampler_steps: int
    budget_minutes: int  # the target on a 2-core CPU, after set-up
    ar_prior: bool  # train the AR prior too (the ar_prior row of the evaluation)
    random_row: bool  # evaluate the random-embedding floor too (a quarter of the generation)


PRESETS = {
    "quick": DemoPreset(
        "quick",
        shapes=20_000,
        eval_n=48,
        eval_decoder_steps=25,
        eval_upsampler_steps=10,
        budget_minutes=15,
        ar_prior=False,  # ~2.5 min more: over the 15 min budget on 2 cores
        random_row=False,  # the floor is chance on every attribute: the full preset shows it
    ),
    "full": DemoPreset(
        "full",
        shapes=20_000,
        eval_n=120,
        eval_decoder_steps=25,
        eval_upsampler_steps=10,
        budget_minutes=75,
        ar_prior=True,
        random_row=True,
    ),
}


@dataclass
class Stage:
    name: str
    argv: list[str] | None  # an `unclip` command, or None for an in-module step
    outputs: list[Path] = field(default_factory=list)


def stages(w: Path, p: DemoPreset, gpu: bool) -> list[Stage]:
    gpu_flag = ["--gpu"] if gpu else []
    train = lambda stage, data: [  # noqa: E731
        "train",
        stage,
        "--data",
        str(data),
        "--out",
        str(w / stage),
        "--preset",
        p.name,
        *gpu_flag,
    ]
    return [
        Stage(
            "shapes",
            ["shapes", "--out", str(w / "shapes"), "--n", str(p.shapes), "--seed", "0"],
            [w / "shapes" / "attributes.parquet"],
        ),
        Stage("clip", train("clip", w / "shapes"), [w / "clip" / "model.safetensors"]),
        Stage(
            "embed",
            [
                "embed",
                "--input",
                str(w / "shapes"),
                "--output",
                str(w / "embeddings"),
                "--clip",
                str(w / "clip"),
                *(["--gpus-per-worker", "1"] if gpu else []),
            ],
            [w / "embeddings"],
        ),
        Stage("prior", train("prior", w / "embeddings"), [w / "prior" / "model.safetensors"]),
        *(
            [
                Stage(
                    "ar_prior",
                    train("ar_prior", w / "embeddings"),
                    [w / "ar_prior" / "model.safetensors"],
                )
            ]
            if p.ar_prior
            else []
        ),
        Stage("decoder", train("decoder", w / "embeddings"), [w / "decoder" / "model.safetensors"]),
        Stage(
            "upsampler",
            train("upsampler", w / "embeddings"),
            [w / "upsampler" / "model.safetensors"],
        ),
        Stage(
            "bundle",
            [
                "bundle",
                "--clip",
                str(w / "clip"),
                "--prior",
                str(w / "prior"),
                "--decoder",
                str(w / "decoder"),
                "--upsampler",
                str(w / "upsampler"),
                "--out",
                str(w / "bundle"),
            ],
            [w / "bundle" / "bundle.json"],
        ),
        Stage("eval", None, [w / "eval.json"]),
        Stage("serve", None, [w / "samples"]),
    ]


def _marker(w: Path, stage: Stage) -> Path:
    return w / ".stages" / f"{stage.name}.json"


def _is_done(w: Path, stage: Stage, preset: str) -> bool:
    m = _marker(w, stage)
    if not m.exists() or not all(o.exists() for o in stage.outputs):
        return False
    rec = json.loads(m.read_text())
    return rec.get("argv") == stage.argv and rec.get("preset") == preset


def _mark(w: Path, stage: Stage, preset: str, seconds: float) -> None:
    m = _marker(w, stage)
    m.parent.mkdir(parents=True, exist_ok=True)
    m.write_text(
        json.dumps(
            {"argv": stage.argv, "preset": preset, "seconds": seconds, "finished": time.time()}
        )
    )


def training_record(w: Path, stage: str) -> dict | None:
    """Steps done / planned of a trained stage, from what its training wrote beside the
    checkpoint (``training.json``; the CLIP's ``metrics.json``), or None if not a training
    stage. ``stopped_early`` is the reason as text, or None."""
    if stage == "clip":
        path = w / "clip" / "metrics.json"
        if not path.exists():
            return None
        m = json.loads(path.read_text())
        done, planned = int(m["steps"]), int(m.get("steps_planned", m["steps"]))
        reason = "time limit reached" if m.get("stopped_early") else None
        return {"steps_done": done, "steps_planned": planned, "stopped_early": reason}
    path = w / stage / "training.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    return {
        "steps_done": int(m["steps_done"]),
        "steps_planned": int(m["steps_planned"]),
        "stopped_early": m.get("stopped_early"),
        "numerics": m.get("numerics"),
    }


def cut_short(training: dict[str, dict]) -> list[str]:
    """Stages that stopped before their planned steps, as 'decoder (550 of 1000 steps)'."""
    return [
        f"{name} ({t['steps_done']} of {t['steps_planned']} steps)"
        for name, t in training.items()
        if t["stopped_early"] or t["steps_done"] < t["steps_planned"]
    ]


def _run_command(argv: list[str]) -> None:
    from unclip.cli import main

    rc = main(argv)
    if rc != 0:
        raise UserError(f"`unclip {' '.join(argv)}` failed (exit {rc}); see the lines above")


def _evaluate(w: Path, p: DemoPreset) -> None:
    from pipelines.evaluate import METHODS, EvalConfig, evaluate, markdown_table

    cfg = EvalConfig(
        n=p.eval_n,
        methods=tuple(m for m in METHODS if m != "random" or p.random_row),
        decoder_steps=p.eval_decoder_steps,
        upsampler_steps=p.eval_upsampler_steps,
        ar_prior=str(w / "ar_prior") if p.ar_prior else "",
    )
    report = evaluate(str(w / "bundle"), str(w / "embeddings"), str(w / "eval"), cfg, preset=p.name)
    shutil.copy(w / "eval" / "eval.json", w / "eval.json")
    print(markdown_table(report))


def _serve_and_call(w: Path, port: int, p: DemoPreset) -> str:
    """Start Serve on the bundle, POST /v1/generate over HTTP (all prompts at once, so Serve
    batches them; the evaluation's decoder and upsampler steps, so that the 16 images fit
    one request deadline on the slowest 2-core CPU too), save the images."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from serving.cli import deploy, load_config, serve_config

    schema = serve_config(load_config(None), str(w / "bundle"), host="127.0.0.1", port=port)
    stages = [d.name for a in schema.applications for d in a.deployments]
    print(f"[serve] starting {len(stages)} deployments ({', '.join(stages)})", flush=True)
    t = time.perf_counter()
    deploy(schema, progress=True)
    url = f"http://127.0.0.1:{port}"
    print(
        f"[serve] ready at {url} in {time.perf_counter() - t:.0f} s; sending {len(PROMPTS)} "
        f"concurrent /v1/generate requests of 4 images each ({p.eval_decoder_steps} decoder, "
        f"{p.eval_upsampler_steps} upsampler steps)",
        flush=True,
    )
    out = w / "samples"
    out.mkdir(parents=True, exist_ok=True)
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            steps = {
                "decoder_steps": p.eval_decoder_steps,
                "upsampler_steps": p.eval_upsampler_steps,
            }
            replies = pool.map(lambda ip: _generate(url, *ip, steps), enumerate(PROMPTS))
            for i, (prompt, reply, seconds) in enumerate(replies):
                for j, b64 in enumerate(reply["images"]):
                    (out / f"prompt{i}_{j}.png").write_bytes(base64.b64decode(b64))
                print(
                    f"  /v1/generate {prompt!r}: {len(reply['images'])} images in "
                    f"{seconds:.1f} s, timings {reply.get('timings')}"
                )
    finally:
        serve.shutdown()
    return url


def _generate(url: str, seed: int, prompt: str, steps: dict[str, int]) -> tuple[str, dict, float]:
    import urllib.error
    import urllib.request

    body = json.dumps({"prompt": prompt, "num_images": 4, "seed": seed, **steps}).encode()
    req = urllib.request.Request(
        f"{url}/v1/generate", data=body, headers={"Content-Type": "application/json"}
    )
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return prompt, json.loads(resp.read()), time.perf_counter() - t
    except urllib.error.HTTPError as e:  # the server's JSON error says what happened
        detail = e.read().decode(errors="replace")[:300]
        raise UserError(
            f"serve: POST /v1/generate {prompt!r} answered {e.code} after "
            f"{time.perf_counter() - t:.0f} s: {detail}; the bundle and its evaluation are "
            "complete: serve it with `unclip serve --bundle WORKDIR/bundle` and ask for fewer "
            "images or steps on this machine"
        ) from None


def _report(
    w: Path, p: DemoPreset, seconds: dict[str, float], url: str, training: dict[str, dict]
) -> None:
    from pipelines.evaluate import EvalReport, MethodResult, markdown_table

    ev = json.loads((w / "eval.json").read_text())
    ev["preset"] = p.name
    ev["seconds"] = {**ev.get("seconds", {}), **{k: round(v, 1) for k, v in seconds.items()}}
    ev["training"] = training
    ev["cut_short"] = cut_short(training)
    ev["machine"] = machine_description()
    (w / "eval.json").write_text(json.dumps(ev, indent=2))
    table = markdown_table(EvalReport([MethodResult(**r) for r in ev["rows"]], p.name))
    timing = "\n".join(
        f"| {k} | {v:.0f} s | {_steps_cell(training.get(k))} |" for k, v in seconds.items()
    )
    total = sum(seconds.values())
    manipulations = ""
    if ev.get("manipulations"):
        from pipelines.evaluate_manipulations import markdown

        manipulations = (
            "\n## Image manipulations (unCLIP paper §3)\n\n"
            + markdown(ev["manipulations"], prefix="eval/")
            + "\n"
        )
    warning = ""
    if ev["cut_short"]:
        warning = (
            "\n> **Not a full run**: " + ", ".join(ev["cut_short"]) + " stopped at a time limit "
            "(a slow or busy machine). The results below are those of less-trained models.\n"
        )
    text = f"""# unclip-ray demo ({p.name} preset)

Machine: {ev["machine"]}. Total {total / 60:.1f} min (target {p.budget_minutes} min).
{warning}
## Evaluation (held-out captions, {ev["rows"][0]["n"]} per method)

{table}

oracle: attribute accuracy read back from the generated images; CLIP score: cosine of the
generated image's CLIP embedding with the caption's; retrieval@10: the caption ranks first
among 10; FD: Fréchet distance of generated vs. real CLIP image embeddings (lower is better).

![samples: rows are methods, columns held-out captions](eval/eval_grid.png)
{manipulations}
## Stages

| stage | time | steps (done / planned, numerics) |
|---|---|---|
{timing}

## Outputs

- dataset `shapes/`, CLIP `clip/`, embeddings `embeddings/`, stages `prior/ decoder/
  upsampler/`, bundle `bundle/`, evaluation `eval.json`, `eval/`, HTTP samples `samples/`.

## Serve it

    unclip serve --bundle {w / "bundle"}
    curl -s {url}/v1/generate -H 'Content-Type: application/json' \\
         -d '{{"prompt": "a small red circle in the top left corner", "num_images": 4}}'
"""
    (w / "report.md").write_text(text)


def _steps_cell(t: dict | None) -> str:
    if t is None:
        return ""
    cell = f"{t['steps_done']} / {t['steps_planned']}"
    if t.get("numerics"):
        cell += f", {t['numerics']}"
    if t["stopped_early"] or t["steps_done"] < t["steps_planned"]:
        cell += " **cut short**"
    return cell


def machine_description() -> str:
    """CPU model, cores, and whether it has AMX / AVX512-BF16 (numbers depend on them)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    has = [name for name in ("amx_bf16", "avx512_bf16", "avx2") if name in flags]
    return f"{model}, {os.cpu_count()} cores" + (f" ({', '.join(has)})" if has else "")


def run(args: argparse.Namespace) -> int:
    import ray

    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; valid: {', '.join(PRESETS)}")
    p = PRESETS[args.preset]
    w = Path(args.workdir).resolve()
    w.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        from ray.serve._private.constants import SERVE_NAMESPACE

        from serving.cli import set_serve_env_defaults

        set_serve_env_defaults()

        # with the dashboard: Ray Train's placement-group cleaner polls the state API
        from infra import local_ray

        ctx = local_ray.init(namespace=SERVE_NAMESPACE, configure_logging=False)
        if ctx.dashboard_url:
            print(f"Ray dashboard: http://{ctx.dashboard_url} (token: `ray get-auth-token`)")
    all_stages = stages(w, p, args.gpu)
    seconds: dict[str, float] = {}
    rerun = False
    url = f"http://127.0.0.1:{args.port}"
    t_all = time.perf_counter()
    for i, stage in enumerate(all_stages, 1):
        head = f"[{i}/{len(all_stages)}] {stage.name}"
        if not rerun and _is_done(w, stage, p.name):
            prev = json.loads(_marker(w, stage).read_text())["seconds"]
            seconds[stage.name] = prev
            print(f"{head}: done already ({prev:.0f} s), skipped", flush=True)
            continue
        rerun = True
        print(
            f"{head}: " + ("unclip " + " ".join(stage.argv) if stage.argv else "running"),
            flush=True,
        )
        t0 = time.perf_counter()
        if stage.argv is not None:
            _run_command(stage.argv)
        elif stage.name == "eval":
            _evaluate(w, p)
        elif stage.name == "serve":
            url = _serve_and_call(w, args.port, p)
        seconds[stage.name] = time.perf_counter() - t0
        _mark(w, stage, p.name, seconds[stage.name])
        print(
            f"{head}: finished in {seconds[stage.name]:.0f} s "
            f"(total {(time.perf_counter() - t_all) / 60:.1f} min)",
            flush=True,
        )
        record = training_record(w, stage.name)
        if record is not None and cut_short({stage.name: record}):
            print(
                f"{head}: WARNING: stopped at step {record['steps_done']} of "
                f"{record['steps_planned']} ({record['stopped_early'] or 'time limit'}); "
                "later results come from a less-trained model",
                flush=True,
            )
    training = {s.name: r for s in all_stages if (r := training_record(w, s.name)) is not None}
    _report(w, p, seconds, url, training)
    if cut_short(training):
        print(f"\nWARNING: cut short by a time limit: {', '.join(cut_short(training))}")
    print(
        f"\ndone. report: {w / 'report.md'}; eval: {w / 'eval.json'}; "
        f"samples: {w / 'samples'}; bundle: {w / 'bundle'}"
    )
    print(f"serve it: unclip serve --bundle {w / 'bundle'}  (then POST {url}/v1/generate)")
    return 0
