"""scripts/batch/ -- batch editing at scale: every edit of every clip in a manifest, on Ray workers.

    python scripts/batch/run_batch.py clips.jsonl --workers 2 --checkpoint v1-5-pruned-emaonly.safetensors
    python scripts/batch/run_batch.py clips.csv --address auto --gpus-per-worker 1 --workers 8

This driver, batch_worker.py (one Ray actor owning one ComfyUI server, started or one of --server) and
batch_manifest.py (the manifest's rows). Each edit runs the shipped tune-and-edit workflow
(workflows/api/tav_tune_and_edit_api.json, or --workflow): a clip is tuned once (its adapter saved); its other
edits load that adapter. Ray starts in this process unless --address joins a cluster. One JSON line per
edit goes to the results file as it ends; a rerun skips items already there (--retry-errors redoes failed
ones). A worker whose server dies hands its edit to another (--retries times at most). Exit 1 if any failed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402  (puts the purpose folders of scripts/ on sys.path)
import batch_manifest as bm  # noqa: E402
from batch_worker import BatchWorker  # noqa: E402

WORKFLOW = _paths.SCRIPTS.parent / "workflows" / "api" / "tav_tune_and_edit_api.json"
ARG_SETTINGS = ("frames", "width", "height", "fps", "tune_steps", "precision", "negative", "seed", "cfg", "steps")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=bm.__doc__)
    p.add_argument("manifest", type=Path, help="a .jsonl or .csv manifest")
    p.add_argument("--results", type=Path, help="results JSONL (default: <manifest>.results.jsonl)")
    p.add_argument("--work-dir", type=Path, default=_paths.SCRIPTS.parent / "out" / "batch",
                   help="the started servers' base folders (worker-<n>/: output/, models/, logs)")
    p.add_argument("--workflow", type=Path, default=WORKFLOW, help="API-format tune-and-edit workflow")
    p.add_argument("--checkpoint", help="checkpoint file (linked into each started server) or a name the servers know")
    p.add_argument("--workers", type=int, default=1, help="ComfyUI workers to start (one per GPU)")
    p.add_argument("--server", action="append", default=[], help="attach to this running ComfyUI (repeat: one worker each)")
    p.add_argument("--address", help="join this Ray cluster ('auto': the local node's) instead of starting Ray here")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="0: CPU servers (--cpu)")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--threads", type=int, help="torch threads per started server (default: cores / workers)")
    p.add_argument("--retries", type=int, default=2, help="times an edit moves on after its worker's death")
    p.add_argument("--retry-errors", action="store_true", help="rerun edits that failed in an earlier run")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per edit")
    for name in ARG_SETTINGS:
        kind = bm.SETTINGS[name]
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"default {name} for rows without one")
    return p.parse_args(argv)


def _log(text):
    print(text, file=sys.stderr, flush=True)


class Batch:
    """The driver: hands items to idle workers, records results, moves items off dead workers."""

    def __init__(self, args, items, done):
        import ray

        self.ray, self.args, self.results = ray, args, args.results
        self.queue = deque(items)
        self.adapters = {r["clip_id"]: r["adapter_ref"] for r in done.values()
                         if r.get("status") == "ok" and r.get("adapter_ref")}
        self.tuning: dict[str, int] = {}
        self.inflight = {}
        self.workers: dict[int, tuple] = {}  # index -> (handle, info)
        self.busy: set[int] = set()
        self.counts = {"ok": 0, "error": 0}
        self.replacements = 0 if args.server else len(items)  # attached servers cannot be replaced
        self.workflow = json.loads(args.workflow.read_text())
        ckpt = Path(args.checkpoint).expanduser() if args.checkpoint else None
        self.ckpt_path = str(ckpt.resolve()) if ckpt and ckpt.is_file() else None
        self.ckpt_name = ckpt.name if self.ckpt_path else args.checkpoint
        opts = {"num_cpus": args.cpus_per_worker, "num_gpus": args.gpus_per_worker, "max_restarts": 0,
                "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(_paths.FOLDERS),
                                             "TAV_DEVICE": "cuda" if args.gpus_per_worker else "cpu"}}}
        self.actor = ray.remote(**opts)(BatchWorker)
        self.threads = args.threads or (None if args.gpus_per_worker else
                                        max(1, (os.cpu_count() or 1) // max(1, args.workers)))

    def start_workers(self, n_workers):
        urls = self.args.server or [None] * n_workers
        for url in urls:
            self._spawn(url)
        for index in list(self.workers):
            handle, _ = self.workers[index]
            try:
                info = self.ray.get(handle.info.remote())
            except Exception as e:  # noqa: BLE001  a worker that cannot start is left out
                _log(f"worker {index} did not start: {e}")
                self.workers.pop(index)
                continue
            self.workers[index] = (handle, info)
            _log(f"worker {index}: ComfyUI {info['url']} on {info['host']}"
                 + (f" (started in {info['server_start_s']} s)" if info["server_start_s"] else ""))
        if not self.workers:
            raise RuntimeError("no worker started; see the server logs in " + str(self.args.work_dir))

    def _spawn(self, url=None):
        index = max(self.workers, default=-1) + 1
        handle = self.actor.remote(index, str(self.args.work_dir.resolve()), self.ckpt_path, url, self.threads)
        self.workers[index] = (handle, None)
        return index

    def _pick(self, index):
        """The next item for worker `index`: an edit of a clip tuned on it, else a clip nobody tunes yet,
        else an edit of a clip tuned elsewhere. Items lost on this worker go elsewhere while others live."""
        url = self.workers[index][1]["url"]
        tiers = [[], [], []]
        for item in self.queue:
            if index in item["lost_on"] and len(self.workers) > 1:
                continue
            adapter, clip = self.adapters.get(item["clip_id"]), item["clip_id"]
            if adapter:
                tiers[0 if adapter.get("url") == url else 2].append(item)
            elif clip not in self.tuning:
                tiers[1].append(item)
        for tier in tiers:
            if tier:
                item = tier[0]
                self.queue.remove(item)
                if not self.adapters.get(item["clip_id"]):
                    self.tuning[item["clip_id"]] = index
                return item
        return None

    def _dispatch(self):
        for index, (handle, _) in self.workers.items():
            if index in self.busy:
                continue
            item = self._pick(index)
            if item is None:
                continue
            job = {k: item[k] for k in ("id", "clip_id", "clip", "source_prompt", "edit", "settings")}
            job.update(workflow=self.workflow, checkpoint=self.ckpt_name, timeout=self.args.timeout,
                       adapter=self.adapters.get(item["clip_id"]))
            self.inflight[handle.run.remote(job)] = (index, item)
            self.busy.add(index)
            item["attempts"] += 1

    def _worker_died(self, index, error):
        self.workers.pop(index, None)
        if not self.args.address and not self.args.server:  # its server outlived it: stop that too
            pid_file = self.args.work_dir / f"worker-{index}" / "server.pid"
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        _log(f"worker {index} died ({error})")
        if self.replacements > 0:
            self.replacements -= 1
            new = self._spawn()
            try:
                self.workers[new] = (self.workers[new][0], self.ray.get(self.workers[new][0].info.remote()))
            except Exception as e:  # noqa: BLE001
                self.workers.pop(new, None)
                _log(f"replacement worker {new} did not start: {e}")

    def run(self, bar):
        while self.queue or self.inflight:
            self._dispatch()
            if not self.inflight:
                for item in list(self.queue):  # nothing can run them
                    self._record(item, {"status": "error", "error": "no worker left to run this edit"}, bar)
                self.queue.clear()
                break
            (ref,), _ = self.ray.wait(list(self.inflight), num_returns=1)
            index, item = self.inflight.pop(ref)
            self.busy.discard(index)
            try:
                res = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                res = {"status": "lost", "worker": index, "error": f"worker {index} died: {first}"}
                self._worker_died(index, first)
            if self.tuning.get(item["clip_id"]) == index:
                self.tuning.pop(item["clip_id"])
            if res["status"] == "lost" and item["attempts"] <= self.args.retries:
                item["lost_on"].add(index)
                item["errors"].append(res["error"])
                _log(f"{item['id']}: {res['error'].splitlines()[0]}; moving it to another worker")
                self.queue.appendleft(item)
                continue
            self._record(item, res, bar)

    def _record(self, item, res, bar):
        status = "ok" if res.get("status") == "ok" else "error"
        adapter = res.get("adapter")
        if status == "ok" and adapter and (res.get("tuned") or item["clip_id"] not in self.adapters):
            self.adapters[item["clip_id"]] = adapter
        record = {"id": item["id"], "key": item["key"], "clip_id": item["clip_id"], "clip": item["clip"],
                  "source_prompt": item["source_prompt"], "edit_prompt": item["edit"]["prompt"],
                  "edit": item["edit"], "settings": item["settings"], "status": status,
                  "videos": res.get("videos", []), "adapter": (adapter or {}).get("path"),
                  "tuned": res.get("tuned"), "worker": res.get("worker"), "host": res.get("host"),
                  "attempts": item["attempts"], "timings": res.get("timings", {}), "scores": res.get("scores", {}),
                  "error": res.get("error"), "earlier_errors": item["errors"], "finished": time.time()}
        if status == "error":
            record["error"] = record["error"] or "failed"
            _log(f"{item['id']}: error: {record['error']}")
        record["adapter_ref"] = adapter  # path, name, server: lets a rerun reuse it
        bm.append_result(self.results, record)
        self.counts[status] += 1
        bar.set_postfix(self.counts, refresh=False)
        bar.update(1)

    def stop(self):
        for handle, _ in self.workers.values():
            with contextlib.suppress(Exception):
                self.ray.get(handle.stop.remote(), timeout=60)


def _init_ray(args, n_workers):
    import ray

    if args.address:
        return ray.init(address=args.address, log_to_driver=False)
    # "local": always a Ray of our own, even where this machine already runs a cluster (--address joins one)
    return ray.init(address="local", num_cpus=max(1, n_workers) * args.cpus_per_worker, include_dashboard=False,
                    log_to_driver=False, object_store_memory=80 * 1024 ** 2, configure_logging=False)


def _summary(items, records, wall, start_s):
    ok = [r for r in records if r["status"] == "ok"]
    _log(f"{len(ok)} of {len(items)} edits ok, {len(records) - len(ok)} failed, in {wall:.1f} s "
         f"({start_s:.1f} s starting Ray and the servers, {wall - start_s:.1f} s editing)")
    if ok:
        stages: dict[str, list] = {}
        for r in ok:
            for name, s in r["timings"].get("nodes_s", {}).items():
                stages.setdefault(name, []).append(s)
        mean = {k: sum(v) / len(ok) for k, v in stages.items()}
        top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(mean.items(), key=lambda kv: -kv[1])[:6])
        total = sum(r["timings"].get("total_s", 0) for r in ok) / len(ok)
        _log(f"per edit (mean, s): {total:.1f} in all; {top}")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.results = args.results or args.manifest.with_name(args.manifest.stem + ".results.jsonl")
    try:
        items = bm.read_manifest(args.manifest)
    except bm.ManifestError as e:
        _log(f"error: {e}")
        return 1
    if not args.workflow.is_file():
        _log(f"error: --workflow {args.workflow}: no such file (see workflows/api/*_api.json)")
        return 1
    if not args.server and not (args.checkpoint and Path(args.checkpoint).expanduser().is_file()):
        _log(f"error: --checkpoint {args.checkpoint or '(none)'}: no such file; give the path of an SD checkpoint "
             "(a bare name works only with --server, for servers that list it)")
        return 1
    if args.workers < 1 or args.retries < 0:
        _log("error: --workers must be at least 1 and --retries at least 0")
        return 1
    defaults = {k: getattr(args, k) for k in ARG_SETTINGS if getattr(args, k) is not None}
    for item in items:  # command-line settings fill what a row leaves out
        item["settings"] = {**{k: v for k, v in defaults.items() if k in bm.CLIP_SETTINGS}, **item["settings"]}
        item["edit"] = {**{k: v for k, v in defaults.items() if k in bm.EDIT_SETTINGS}, **item["edit"]}
    done = bm.read_results(args.results)
    keep = {"ok"} if args.retry_errors else {"ok", "error"}
    todo = [dict(it, attempts=0, lost_on=set(), errors=[]) for it in items
            if done.get(it["key"], {}).get("status") not in keep]
    _log(f"{len(items)} edits in {args.manifest}: {len(items) - len(todo)} already in {args.results}, "
         f"{len(todo)} to run")
    if not todo:
        return 0
    t0 = time.monotonic()
    n_workers = len(args.server) or args.workers
    import ray
    from tqdm import tqdm  # ComfyUI's own requirement

    _init_ray(args, n_workers)
    batch = Batch(args, todo, done)
    bar = None
    try:
        batch.start_workers(min(n_workers, len(todo)))
        start_s = time.monotonic() - t0
        bar = tqdm(total=len(todo), unit="edit", file=sys.stderr, smoothing=0)  # with its ETA
        batch.run(bar)
    except RuntimeError as e:  # no worker could start: nothing was run
        _log(f"error: {e}")
        return 1
    finally:
        bar is None or bar.close()
        batch.stop()
        ray.shutdown()
    records = [r for r in bm.read_results(args.results).values() if r["key"] in {it["key"] for it in todo}]
    _summary(todo, records, time.monotonic() - t0, start_s)
    return 0 if batch.counts["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
