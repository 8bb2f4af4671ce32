"""`unclip demo`: the stage plan and the skip-if-complete bookkeeping (the whole run is what
`make demo` does; its numbers are in the README)."""

from __future__ import annotations

from pathlib import Path

from pipelines.demo import PRESETS, _is_done, _mark, stages
from unclip.cli import build_parser


def test_every_stage_is_a_valid_unclip_command_in_order(tmp_path) -> None:
    for name, preset in PRESETS.items():
        plan = stages(tmp_path, preset, gpu=False)
        names = [s.name for s in plan]
        assert names[:4] == ["shapes", "clip", "embed", "prior"]
        assert names[-4:] == ["upsampler", "bundle", "eval", "serve"]
        assert ("ar_prior" in names) == preset.ar_prior
        for s in plan:
            if s.argv is not None:
                build_parser().parse_args(s.argv)  # SystemExit on a bad command
                if s.argv[0] == "train":
                    assert s.argv[s.argv.index("--preset") + 1] == name
    gpu = stages(tmp_path, PRESETS["quick"], gpu=True)
    assert all("--gpu" in s.argv for s in gpu if s.argv and s.argv[0] == "train")


def test_a_stage_is_skipped_only_when_its_outputs_and_command_match(tmp_path: Path) -> None:
    plan = {s.name: s for s in stages(tmp_path, PRESETS["quick"], gpu=False)}
    clip = plan["clip"]
    assert not _is_done(tmp_path, clip, "quick")
    _mark(tmp_path, clip, "quick", 12.0)
    assert not _is_done(tmp_path, clip, "quick")  # marked, but its outputs are missing
    for out in clip.outputs:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"x")
    assert _is_done(tmp_path, clip, "quick")
    assert not _is_done(tmp_path, clip, "full")  # another preset reruns it
    full_clip = {s.name: s for s in stages(tmp_path, PRESETS["full"], gpu=False)}["clip"]
    assert not _is_done(tmp_path, full_clip, "quick")  # another command reruns it
