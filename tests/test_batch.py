"""Batch editing on Ray (scripts/batch/run_batch.py): the real CLI, Ray started in it, 2 workers each owning a
real ComfyUI server, the shipped tune-and-edit workflow at a tiny size on the random checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import batch_manifest
import batch_worker
import make_sample_clip
import workflow_substitute

PACK_DIR = Path(__file__).resolve().parent.parent
SMALL = ["--frames", "2", "--width", "64", "--height", "64", "--steps", "1", "--tune-steps", "1",
         "--precision", "fp32"]  # seconds per edit on 2 CPU cores


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    for name in "abc":
        make_sample_clip.make_sample_clip(folder / f"{name}.mp4", seconds=1, fps=8, size=64)
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batch(manifest, work, checkpoint, *extra, timeout=600, on_poll=None):
    """Run the CLI with 2 workers; (exit status, stderr, results by id)."""
    cmd = [sys.executable, str(PACK_DIR / "scripts" / "batch" / "run_batch.py"), str(manifest), "--workers", "2",
           "--work-dir", str(work), "--checkpoint", str(checkpoint), *SMALL, *extra]
    log = work.parent / f"{work.name}.stderr"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=PACK_DIR)
        deadline = time.time() + timeout
        try:
            while proc.poll() is None and time.time() < deadline:
                if on_poll:
                    on_poll()
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    records = [json.loads(line) for line in manifest.with_name(manifest.stem + ".results.jsonl").read_text().splitlines()]
    return proc.returncode, log.read_text(), records


def videos_on_disk(work):
    return sorted(work.glob("worker-*/output/batch/**/*.mp4"))


# --- the manifest, without servers -------------------------------------------------------------

def test_manifest_jsonl_and_csv_give_the_same_items(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [
        {"id": "ball", "clip": "a.mp4", "source_prompt": "a ball", "frames": 4,
         "edits": ["a red ball", {"prompt": "a blue ball", "seed": 3}]},
        {"clip": "b.mp4", "source_prompt": "a kite", "edit_prompt": "a cartoon kite"}])
    (tmp_path / "m.csv").write_text("id,clip,source_prompt,edit_prompt,frames,seed\n"
                                    "ball,a.mp4,a ball,a red ball,4,\n"
                                    "ball,a.mp4,a ball,a blue ball,4,3\n"
                                    ",b.mp4,a kite,a cartoon kite,,\n")
    from_jsonl = batch_manifest.read_manifest(tmp_path / "m.jsonl")
    from_csv = batch_manifest.read_manifest(tmp_path / "m.csv")
    assert from_jsonl == from_csv
    assert [it["id"] for it in from_jsonl][:2] == ["ball#1", "ball#2"]
    assert from_jsonl[0]["clip"] == str(tmp_path / "a.mp4") and from_jsonl[0]["settings"] == {"frames": 4}
    assert from_jsonl[1]["edit"] == {"prompt": "a blue ball", "seed": 3}
    assert len({it["key"] for it in from_jsonl}) == 3


@pytest.mark.parametrize("row, words", [
    ({"clip": "a.mp4", "edit_prompt": "x"}, "source_prompt"),
    ({"clip": "a.mp4", "source_prompt": "a", "edits": []}, "no edits"),
    ({"clip": "a.mp4", "source_prompt": "a", "edit_prompt": "x", "frames": "many"}, "frames"),
    ({"clip": "a.mp4", "source_prompt": "a", "edit_prompt": "x", "strength": 1}, "unknown setting 'strength'"),
])
def test_manifest_errors_name_the_line_and_the_field(tmp_path, row, words):
    path = write_jsonl(tmp_path / "m.jsonl", [{"clip": "b.mp4", "source_prompt": "b", "edit_prompt": "y"}, row])
    with pytest.raises(batch_manifest.ManifestError, match=f"m.jsonl:2: .*{words}"):
        batch_manifest.read_manifest(path)


def test_results_file_keeps_the_last_record_per_item_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    batch_manifest.append_result(path, {"key": "k1", "status": "error"})
    with path.open("a") as f:
        f.write('{"key": "k2", "sta')  # a run killed while writing
    batch_manifest.append_result(path, {"key": "k1", "status": "ok"})
    assert batch_manifest.read_results(path) == {"k1": {"key": "k1", "status": "ok"}}


def test_reused_adapter_replaces_the_tuning_in_the_shipped_workflow():
    api = json.loads((PACK_DIR / "workflows" / "api" / "tav_tune_and_edit_api.json").read_text())
    out = batch_worker.with_adapter(api, "batch_adapters/a.safetensors")
    (tune,) = workflow_substitute.nodes_of(api, "TuneAVideoTune")
    assert out[tune]["class_type"] == "TuneAVideoLoadAdapter"
    assert out[tune]["inputs"] == {"model": api[tune]["inputs"]["model"], "adapter_name": "batch_adapters/a.safetensors"}
    assert not workflow_substitute.nodes_of(out, "TuneAVideoSaveAdapter") and workflow_substitute.nodes_of(api, "TuneAVideoSaveAdapter")
    for nid in ("TuneAVideoInvert", "TuneAVideoSampler"):
        assert out[workflow_substitute.nodes_of(out, nid)[0]]["inputs"]["model"] == [tune, 0]
    with pytest.raises(workflow_substitute.WorkflowError, match="no TuneAVideoTune"):
        batch_worker.with_adapter(out, "x.safetensors")


# --- on 2 Ray workers with real ComfyUI servers ----------------------------------------------------

@pytest.fixture(scope="module")
def first_run(clips, random_checkpoint, tmp_path_factory):
    """Three clips (one with two edits) and one whose file is missing."""
    folder = tmp_path_factory.mktemp("batch")
    manifest = write_jsonl(folder / "clips.jsonl", [
        {"id": "ball", "clip": str(clips / "a.mp4"), "source_prompt": "a ball",
         "edits": ["a red ball", {"prompt": "a blue ball", "seed": 3}]},
        {"id": "square", "clip": str(clips / "b.mp4"), "source_prompt": "a square", "edit_prompt": "a green square"},
        {"id": "kite", "clip": str(clips / "c.mp4"), "source_prompt": "a kite", "edit_prompt": "a cartoon kite"},
        {"id": "gone", "clip": str(clips / "missing.mp4"), "source_prompt": "a cat", "edit_prompt": "a dog"}])
    return manifest, folder / "work", batch(manifest, folder / "work", random_checkpoint)


def test_every_edit_completes_and_a_missing_clip_is_its_own_error(first_run):
    manifest, work, (rc, err, records) = first_run
    by_id = {r["id"]: r for r in records}
    assert rc == 1, err  # one edit failed
    assert sorted(by_id) == ["ball#1", "ball#2", "gone#1", "kite#1", "square#1"] and len(records) == 5, err
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 4, err
    for r in ok:
        assert len(r["videos"]) == 1 and Path(r["videos"][0]).stat().st_size > 0
        assert Path(r["adapter"]).suffix == ".safetensors" and Path(r["adapter"]).is_file()
        assert r["timings"]["total_s"] > 0 and r["error"] is None
    assert len(videos_on_disk(work)) == 4
    assert {r["worker"] for r in ok} == {0, 1}, "both workers should take edits"
    gone = by_id["gone#1"]
    assert gone["status"] == "error" and "missing.mp4: no such file" in gone["error"], gone
    assert "gone#1: error: clip" in err and "4 of 5 edits ok, 1 failed" in err


def test_a_clip_is_tuned_once_and_its_adapter_reused(first_run):
    _, _, (_, err, records) = first_run
    by_id = {r["id"]: r for r in records}
    first, second = by_id["ball#1"], by_id["ball#2"]
    assert (first["tuned"], second["tuned"]) == (True, False), err
    assert second["adapter"] == first["adapter"]
    assert "TuneAVideoTune" in first["timings"]["nodes_s"]
    assert "TuneAVideoTune" not in second["timings"]["nodes_s"]
    assert "TuneAVideoLoadAdapter" in second["timings"]["nodes_s"]
    assert by_id["square#1"]["adapter"] != first["adapter"]


def test_a_rerun_redoes_nothing(first_run, random_checkpoint):
    manifest, work, (_, _, records) = first_run
    rc, err, again = batch(manifest, work, random_checkpoint, timeout=120)
    assert rc == 0, err
    assert "5 already in" in err and "0 to run" in err
    assert again == records and len(videos_on_disk(work)) == 4


def test_a_killed_server_hands_its_edit_to_the_other_worker(clips, random_checkpoint, tmp_path):
    (tmp_path / "clips.csv").write_text(
        "clip,source_prompt,edit_prompt,seed\n"
        f"{clips / 'a.mp4'},a ball,a red ball,\n"
        f"{clips / 'a.mp4'},a ball,a blue ball,3\n"
        f"{clips / 'b.mp4'},a square,a green square,\n"
        f"{clips / 'c.mp4'},a kite,a cartoon kite,\n")
    work, killed = tmp_path / "work", []

    def kill_worker_0_at_its_first_prompt():
        log, pid = work / "worker-0" / "server.log", work / "worker-0" / "server.pid"
        if not killed and pid.is_file() and log.is_file() and "got prompt" in log.read_text(errors="replace"):
            os.kill(int(pid.read_text()), signal.SIGKILL)
            killed.append(int(pid.read_text()))

    rc, err, records = batch(tmp_path / "clips.csv", work, random_checkpoint, on_poll=kill_worker_0_at_its_first_prompt)
    assert killed, err
    assert rc == 0, err
    assert len(records) == 4 and len({r["key"] for r in records}) == 4, "an edit ran twice or not at all"
    assert all(r["status"] == "ok" for r in records), err
    moved = [r for r in records if r["attempts"] == 2]
    assert len(moved) == 1, err
    assert moved[0]["worker"] == 1 and "died" in moved[0]["earlier_errors"][0]
    assert len(videos_on_disk(work)) == 4  # the killed edit never finished on worker 0
