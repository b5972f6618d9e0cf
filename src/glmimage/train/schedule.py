"""`glmimage train all`: every stage from nothing, laid out on the CPU's cores the way the embedded model was trained.

Most stages are bound by one core's worth of work (small models, batch 64), so two stages side by side finish in
about the time of one. With two cores or more (half of them per lane):

    data (all cores)
    lane A: vae (first leg) ───→ dit (one process) ─────────────┐ paused when lane B is done (<out>/dit/STOP)
    lane B: tokenizer ids → tokenizer ViT → ar → vae decoder leg ┘
    dit resumed under torchrun, 2 processes, to its last step (same losses as one process, tests/test_train.py)
    assemble <out>/model

The DiT waits for the tokenizer's ids as well as the VAE's latents; the AR for the ViT, whose reading of the edit
sources its edit rows train on. The VAE's decoder leg (`decoder_steps`) changes no latent, so lane A's vae stops at
the first leg's end and the DiT starts on its latents; the leg resumes from there at the end of lane B (the same
weights as one run, tests/test_train.py), off the DiT's path. Each stage runs in its own process (a torch thread
count is per process) and writes its output to <out>/logs/<job>.log (data, vae, tokenizer-ids, ar, tokenizer,
vae-decoder, dit-lane, dit-ddp); this process prints when a job starts and ends and, every minute, the step each
running stage has logged. With one core, or `lanes=False`, the stages run one after another in this process. A
failed stage stops the other lane (its checkpoint is kept) and raises with the tail of its log; running `train all`
again resumes every stage where it stopped.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hms(s: float) -> str:
    return f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"


class Runner:
    """Starts stage processes, logs each to <out>/logs/<name>.log, stops them all on the first failure."""

    def __init__(self, out: str, recipe: str, overrides: dict) -> None:
        self.out, self.recipe, self.t0 = Path(out), recipe, time.time()
        self.overrides = {k: v for k, v in overrides.items() if k not in ("out", "threads")}
        self.running: dict[str, subprocess.Popen] = {}
        self.failed: str | None = None
        self.lock = threading.Lock()
        (self.out / "logs").mkdir(parents=True, exist_ok=True)

    def say(self, msg: str) -> None:
        print(f"[{_hms(time.time() - self.t0)}] {msg}", flush=True)

    def command(self, stage: str, threads: int, procs: int = 1, steps: int | None = None, **extra) -> list[str]:
        launch = [sys.executable, "-m", "glmimage"]
        if procs > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                      "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "glmimage"]
        from glmimage.train import for_stage

        sets = [f"--set={k}={v}" for k, v in {**for_stage(stage, self.overrides), **extra}.items()]
        cmd = launch + ["train", stage, "--out", str(self.out), "--threads", str(threads), *sets]
        cmd += ["--quick"] if self.recipe == "quick" else []
        return cmd + ([] if steps is None else ["--steps", str(steps)])

    def run(self, name: str, cmd: list[str]) -> None:
        """Run one stage process to its end; raise (and stop the others) when it fails."""
        if self.failed:
            raise RuntimeError(f"not starting {name}: {self.failed} failed")
        log = self.out / "logs" / f"{name}.log"
        t = time.time()
        self.say(f"{name}: started ({' '.join(cmd[1:])}; log {log})")
        with open(log, "w") as f, self.lock:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.running[name] = p
        rc = p.wait()
        with self.lock:
            self.running.pop(name, None)
        if rc != 0:
            with self.lock:
                first = self.failed is None
                self.failed = self.failed or name
                others = list(self.running.values())
            for q in others:
                q.terminate()
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:]) if first else ""
            raise RuntimeError(f"stage {name} exited with {rc} after {time.time() - t:.0f} s; {log}:\n{tail}")
        self.say(f"{name}: done in {_hms(time.time() - t)}")

    def progress(self) -> str:
        """'vae 820/1500 · ar 310/5500' from each running stage's metrics.jsonl and train_config.json."""
        from glmimage.train import stage_config

        parts = []
        for name in list(self.running):
            stage = name.split("-")[0]
            try:
                last = (self.out / stage / "metrics.jsonl").read_text().rstrip().rsplit("\n", 1)[-1]
                cfg = json.loads((self.out / stage / "train_config.json").read_text())
                total = stage_config(stage, self.recipe, **cfg).total_steps  # the vae's decoder leg counts on
                parts.append(f"{name} {json.loads(last)['step'] + 1}/{total}")
            except (OSError, ValueError, KeyError, IndexError):
                parts.append(f"{name} starting")
        return " · ".join(parts)


def run_all(recipe: str, overrides: dict, *, lanes: bool | None = None, progress_every: float = 60.0) -> Path:
    """Every stage from nothing (or from where a previous `train all` stopped), then assemble; returns the model."""
    from glmimage.train import STAGES, for_stage, run, stage_config
    from glmimage.train.assemble import assemble

    out = overrides.get("out", "runs/world")
    n = cores()
    lanes = n >= 2 if lanes is None else lanes
    t0 = time.time()
    if not lanes:
        for s in STAGES:
            print(f"== stage {s} ({recipe}) ==", flush=True)
            run(s, recipe, **for_stage(s, overrides))
    else:
        r = Runner(out, recipe, overrides)
        t = overrides.get("threads") or max(1, n // 2)
        stop_file = Path(out) / "dit" / "STOP"
        stop_file.unlink(missing_ok=True)  # left by an interrupted `train all`
        r.run("data", r.command("data", n))
        ids_ready, vae_done, lane_b_done = threading.Event(), threading.Event(), threading.Event()
        errors: list[BaseException] = []
        vae_cfg = stage_config("vae", recipe, **for_stage("vae", overrides))
        decoder_leg = vae_cfg.total_steps > vae_cfg.steps

        def lane(jobs):
            try:
                for job in jobs:
                    job()
            except BaseException as e:  # noqa: BLE001 -- reported by the main thread
                errors.append(e)
            finally:
                ids_ready.set()  # never leave the other lane waiting on a lane that died
                vae_done.set()

        def vae_first_leg():
            r.run("vae", r.command("vae", t, **({"decoder_steps": 0} if decoder_leg else {})))
            vae_done.set()

        def vae_decoder_leg():
            vae_done.wait()  # resumes from the first leg's checkpoint
            r.run("vae-decoder", r.command("vae", t))

        def lane_b_end():
            lane_b_done.set()
            stop_file.parent.mkdir(parents=True, exist_ok=True)
            stop_file.touch()  # lane A's dit checkpoints and exits (at once if it starts later); resumed below

        def dit_alone():
            ids_ready.wait()
            if lane_b_done.is_set() or r.failed:
                return  # nothing left to share the cores with: the DiT runs on all of them below
            r.run("dit-lane", r.command("dit", t))

        a = threading.Thread(target=lane, args=([vae_first_leg, dit_alone],))
        b = threading.Thread(target=lane, args=([lambda: r.run("tokenizer-ids", r.command("tokenizer", t, steps=0)),
                                                ids_ready.set,
                                                lambda: r.run("tokenizer", r.command("tokenizer", t)),
                                                lambda: r.run("ar", r.command("ar", t)),
                                                *([vae_decoder_leg] if decoder_leg else []),
                                                lane_b_end],))
        a.start(), b.start()
        while a.is_alive() or b.is_alive():
            (a if a.is_alive() else b).join(progress_every)  # a minute, or until the lane waited on ends
            if a.is_alive() or b.is_alive():
                r.say(r.progress())
        if errors:
            raise errors[0]
        stop_file.unlink(missing_ok=True)  # in case lane A's dit had finished before it saw the file
        procs = 2 if n >= 2 else 1
        r.run("dit-ddp", r.command("dit", max(1, t * 2 // procs), procs=procs))
    path = assemble(out)
    print(f"== all stages done in {_hms(time.time() - t0)}; model: {path} ==", flush=True)
    return path
