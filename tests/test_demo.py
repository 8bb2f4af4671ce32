"""`unclip demo`: the stage plan and the skip-if-complete bookkeeping (the whole run is what
`make demo` does; its numbers are in the README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.demo import PRESETS, _is_done, _mark, _report, cut_short, stages, training_record
from unclip.cli import build_parser
from unclip.errors import UserError


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


def test_a_stage_cut_short_is_reported_in_console_report_and_eval_json(tmp_path: Path) -> None:
    w = tmp_path
    (w / "clip").mkdir()
    (w / "clip" / "metrics.json").write_text(
        json.dumps({"steps": 240, "steps_planned": 240, "stopped_early": False})
    )
    (w / "decoder").mkdir()
    (w / "decoder" / "training.json").write_text(
        json.dumps(
            {
                "steps_done": 550,
                "steps_planned": 1000,
                "stopped_early": "time limit of 7 min reached",
                "numerics": "fp32/channels_last/2t",
            }
        )
    )
    training = {n: r for n in ("clip", "prior", "decoder") if (r := training_record(w, n))}
    assert set(training) == {"clip", "decoder"}  # the prior left no record here
    assert cut_short(training) == ["decoder (550 of 1000 steps)"]
    row = {
        "method": "diffusion_prior",
        "oracle": {"colour": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "all": 1.0},
        "clip_score": 0.9,
        "retrieval_top1": 1.0,
        "fd": 0.1,
        "n": 4,
    }
    (w / "eval.json").write_text(json.dumps({"rows": [row]}))
    _report(w, PRESETS["quick"], {"clip": 100.0, "decoder": 420.0}, "http://x", training)
    ev = json.loads((w / "eval.json").read_text())
    assert ev["cut_short"] == ["decoder (550 of 1000 steps)"]
    assert ev["training"]["decoder"]["steps_done"] == 550
    report = (w / "report.md").read_text()
    assert "Not a full run" in report and "decoder (550 of 1000 steps)" in report
    assert "550 / 1000, fp32/channels_last/2t **cut short**" in report
    assert "240 / 240 |" in report  # the CLIP ran all its steps: not marked

    # a complete run says nothing of the kind
    training["decoder"] = {**training["decoder"], "steps_done": 1000, "stopped_early": None}
    _report(w, PRESETS["quick"], {"clip": 100.0}, "http://x", training)
    assert "Not a full run" not in (w / "report.md").read_text()
    assert json.loads((w / "eval.json").read_text())["cut_short"] == []


def test_a_failed_sample_request_ends_with_one_line_naming_the_answer() -> None:
    """The demo's HTTP step against a server that answers 504 (as Serve does past a
    request's deadline on a slow CPU): a UserError with the status and the server's message,
    not a traceback; the request carried the evaluation's step counts."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from pipelines.demo import _generate

    seen: list[dict] = []

    class Answer504(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = b'{"error": "deadline of 90 s passed"}'
            self.send_response(504)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Answer504)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(UserError, match=r"answered 504 .*deadline of 90 s passed"):
            _generate(url, 0, "a red circle", {"decoder_steps": 25, "upsampler_steps": 10})
    finally:
        server.shutdown()
    assert seen[0]["decoder_steps"] == 25 and seen[0]["upsampler_steps"] == 10
