"""The ``unclip`` command line (README.md, "CLI"; docs/architecture.md for the layers).

Each subcommand is parsed here and run by a ``run(args)`` function in its layer, imported
lazily (so ``unclip --help`` is fast and the core never imports Ray). Errors a user can
cause end with one line on stderr and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence

from unclip.errors import UserError

EXIT_USER_ERROR = 1
EXIT_NOT_BUILT = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from unclip.checkpoint import CheckpointError
    from unclip.clip_identity import ClipLoadError
    from unclip.config import ConfigError

    return (
        UserError,
        ConfigError,
        CheckpointError,
        ClipLoadError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    )


# subcommand -> "module:function" running it
COMMANDS: dict[str, str] = {
    "shapes": "pipelines.shapes:run",
    "embed": "pipelines.embed:run",
    "import-embeddings": "pipelines.import_embeddings:run",
    "train": "training.cli:run",
    "bundle": "unclip.commands:bundle",
    "generate": "unclip.commands:generate",
    "vary": "unclip.commands:vary",
    "interpolate": "unclip.commands:interpolate",
    "text-diff": "unclip.commands:text_diff",
    "serve": "serving.cli:run",
    "eval": "pipelines.evaluate:run",
    "demo": "pipelines.demo:run",
    "submit": "infra.submit:run",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unclip",
        description="unCLIP (DALL-E 2) on Ray: embedding ETL, training, serving, evaluation.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("shapes", help="make the embedded captioned shapes dataset")
    s.add_argument("--out", required=True, help="output folder (local path or s3://)")
    s.add_argument("--n", type=int, default=20000, help="number of images (default 20000)")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--two-object-fraction",
        type=float,
        default=0.0,
        help="fraction of two-object scenes (attribute binding), default 0",
    )

    e = sub.add_parser("embed", help="incremental Ray Data ETL: images + captions -> Parquet")
    e.add_argument("--input", required=True, help="image folder, Parquet, or webdataset .tar")
    e.add_argument("--output", required=True, help="embedding table folder (local or s3://)")
    e.add_argument(
        "--clip",
        default=None,
        help="open_clip model name or CLIP checkpoint URI (from `unclip train clip`)",
    )
    e.add_argument("--pretrained", default="", help="open_clip pretrained tag or weights path")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--workers", type=int, default=1, help="embedding actors")
    e.add_argument("--gpus-per-worker", type=float, default=0.0)
    e.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs reserved per actor")
    e.add_argument(
        "--threads-per-worker",
        type=int,
        default=0,
        help="threads per actor (0 = the CPUs of a node / the actors on it)",
    )
    e.add_argument(
        "--rows-per-read", type=int, default=256, help="rows read and decoded per CPU task"
    )
    e.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="resolution of the re-encoded image column (0 = no image column)",
    )
    e.add_argument(
        "--max-error-fraction",
        type=float,
        default=0.1,
        help="fail the job if more than this fraction of rows is bad",
    )
    e.add_argument(
        "--lease-wait",
        type=float,
        default=0.0,
        help="seconds to wait while another run holds the output's lease (0 = exit at once)",
    )
    e.add_argument(
        "--lease-ttl",
        type=float,
        default=180.0,
        help="seconds without a heartbeat after which a run's lease (a killed run's) expires",
    )

    i = sub.add_parser(
        "import-embeddings",
        help="precomputed CLIP embeddings (clip-retrieval) -> embedding table without images",
    )
    i.add_argument("--format", choices=["clip-retrieval"], default="clip-retrieval")
    i.add_argument(
        "--input",
        required=True,
        help="folder with img_emb/, text_emb/, metadata/ (local or s3://)",
    )
    i.add_argument("--output", required=True, help="embedding table folder (local or s3://)")
    i.add_argument(
        "--clip",
        required=True,
        help="the CLIP that made the embeddings: open_clip name or CLIP checkpoint URI",
    )
    i.add_argument("--pretrained", default="", help="its open_clip pretrained tag (recorded)")
    i.add_argument(
        "--renormalize",
        action="store_true",
        help="L2-normalise embeddings whose norms are not 1 (else they are refused)",
    )

    t = sub.add_parser("train", help="train a stage with Ray Train")
    t.add_argument("stage", choices=["clip", "prior", "ar_prior", "decoder", "upsampler"])
    t.add_argument(
        "--data",
        required=True,
        help="embedding table (prior/decoder/upsampler) or image folder (clip)",
    )
    t.add_argument("--out", required=True, help="final checkpoint directory (local or s3://)")
    t.add_argument("--preset", choices=["quick", "full"], default="quick")
    t.add_argument("--config", default=None, help="stage config file (YAML or JSON)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--gpu", action="store_true")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out's run directory after a driver crash",
    )
    t.add_argument(
        "--storage",
        default=None,
        help="Ray Train storage path for run checkpoints (default: beside --out)",
    )

    b = sub.add_parser("bundle", help="assemble stage checkpoints into a serving bundle")
    b.add_argument("--clip", required=True, help="CLIP checkpoint URI or open_clip name")
    b.add_argument("--pretrained", default="")
    b.add_argument("--prior", required=True)
    b.add_argument("--decoder", required=True)
    b.add_argument("--upsampler", action="append", default=[], help="repeat, lowest first")
    b.add_argument("--out", required=True)

    g = sub.add_parser("generate", help="text -> images in-process (no Serve)")
    g.add_argument("prompt")
    g.add_argument("--bundle", required=True)
    g.add_argument("-n", "--num-images", type=int, default=4)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-o", "--out", required=True, help="output PNG (a grid of the images)")
    g.add_argument("--prior-steps", type=int, default=None)
    g.add_argument("--decoder-steps", type=int, default=None)
    g.add_argument("--upsampler-steps", type=int, default=None)
    g.add_argument("--prior-guidance-scale", type=float, default=None)
    g.add_argument("--decoder-guidance-scale", type=float, default=None)
    g.add_argument("--candidates", type=int, default=None)
    g.add_argument("--device", default="cpu")

    def manipulation(name: str, help: str, images: list[str]) -> argparse.ArgumentParser:
        m = sub.add_parser(name, help=help)
        for image in images:
            m.add_argument(image, help="an image file (PNG, JPEG, ...; local path or s3://)")
        m.add_argument("--bundle", required=True)
        m.add_argument("--seed", type=int, default=0)
        m.add_argument("-o", "--out", required=True, help="output PNG (the images in a row)")
        m.add_argument(
            "--latent-steps",
            type=int,
            default=None,
            help="DDIM steps of the inversion and of decoding the latents (default: the "
            "bundle's, 200; fewer is faster and reconstructs less exactly)",
        )
        m.add_argument("--device", default="cpu")
        return m

    m = manipulation("vary", "variations of an image (the same code as /v1/variations)", ["image"])
    m.add_argument("-n", "--num-images", type=int, default=4)
    m.add_argument(
        "--eta", type=float, default=None, help="DDIM eta: 0 gives the image back (default 0.8)"
    )
    m = manipulation(
        "interpolate", "frames between two images (as /v1/interpolate)", ["image_a", "image_b"]
    )
    m.add_argument("--frames", type=int, default=5)
    m.add_argument(
        "--fixed-noise", action="store_true", help="hold x_T at image_a's instead of slerping it"
    )
    m = manipulation("text-diff", "edit an image towards a caption (as /v1/text-diff)", ["image"])
    m.add_argument("--to", required=True, dest="to_text", help="the caption to move towards")
    m.add_argument(
        "--from", default=None, dest="from_text", help='a caption of the image (default "a photo")'
    )
    m.add_argument("--frames", type=int, default=5)
    m.add_argument("--max-strength", type=float, default=None, help="largest theta (default 0.5)")

    v = sub.add_parser("serve", help="serve a bundle over HTTP with Ray Serve")
    v.add_argument("--bundle", required=True)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument(
        "--config",
        default=None,
        help="Serve config YAML (default: serving/config.yaml with GPUs, else config.cpu.yaml)",
    )
    v.add_argument(
        "--insecure-no-api-key",
        action="store_true",
        help="allow a non-loopback --host without UNCLIP_API_KEY (anyone who reaches it may use it)",
    )

    ev = sub.add_parser("eval", help="evaluate a bundle like the paper's ablation")
    ev.add_argument("--bundle", required=True)
    ev.add_argument("--data", required=True, help="embedding table with held-out rows")
    ev.add_argument("--out", required=True)
    ev.add_argument("--n", type=int, default=None, help="held-out captions to generate for")
    ev.add_argument("--ar-prior", default=None, help="AR prior checkpoint: adds the ar_prior row")

    d = sub.add_parser("demo", help="the whole pipeline end to end on the embedded default")
    d.add_argument("--workdir", default="work/demo")
    d.add_argument("--preset", choices=["quick", "full"], default="quick")
    d.add_argument("--gpu", action="store_true")
    d.add_argument("--port", type=int, default=8000)

    j = sub.add_parser("submit", help="run an unclip command as a Ray job on a cluster")
    j.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://head:8265")
    j.add_argument("--no-wait", action="store_true", help="print the job id and return")
    j.add_argument("rest", nargs=argparse.REMAINDER, help="-- <any unclip command>")
    return p


def _resolve(target: str) -> Callable[[argparse.Namespace], int | None] | None:
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            return None
        raise
    except AttributeError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = _resolve(COMMANDS[args.command])
    if run is None:
        print(f"unclip {args.command}: not built yet in this version", file=sys.stderr)
        return EXIT_NOT_BUILT
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        rc = run(args)
        return rc if isinstance(rc, int) else 0
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
