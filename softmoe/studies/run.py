"""Train and evaluate a study's runs: the missing ones in plan order (`--next N`), side by side in worker
processes (`--jobs`), each evaluated once (cached in <run_dir>/eval/) and summarised; then the results
(studies/results.py) from every run there is."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from softmoe.common.checks import check_int
from softmoe.data.io import read_json
from softmoe.eval.evaluate import EvalSettings, evaluate_checkpoint, write_eval
from softmoe.routing import router_class
from softmoe.studies.plan import PlannedRun, Study, Variant, plan_runs, shown_path
from softmoe.studies.results import TASK_METRICS, write_results
from softmoe.studies.summaries import build_summary, check_summary, load_summary, record_of, summary_path, write_summary
from softmoe.train.checkpoint import latest_good_checkpoint
from softmoe.train.config import RunConfig
from softmoe.train.metrics import read_metrics
from softmoe.train.runs import is_finished, prepared_dataset_dir, train_or_reuse

__all__ = ["run_one", "run_study"]


def _cached_eval(run_dir: Path, settings: EvalSettings) -> dict | None:
    """The run's eval.json if it measured the newest checkpoint with these settings."""
    path = run_dir / "eval" / "eval.json"
    if not path.is_file():
        return None
    payload = read_json(path)
    newest = latest_good_checkpoint(run_dir / "checkpoints", lambda message: None)
    wanted = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
    same = all(payload["settings"].get(k) == v for k, v in wanted.items() if v is not None)
    return payload if same and newest is not None and payload["model"]["checkpoint"] == str(newest) else None


def _evaluate_run(run_dir: Path, settings: EvalSettings, progress: bool = False) -> dict:
    payload = _cached_eval(run_dir, settings)
    if payload is not None:
        print(f"{run_dir}: evaluation cached in eval/eval.json", flush=True)
        return payload
    payload, points = evaluate_checkpoint(run_dir, settings, report=lambda message: print(message, flush=True),
                                          progress=progress)
    write_eval(payload, points, run_dir / "eval")
    return payload


def _noise_ae(run: PlannedRun, run_dir: Path, batches: int = 8) -> dict:
    """Train-mode realized AE of the final checkpoint with the gate noise on and off (eval/noise.py), on the first
    `batches` validation batches; {} for a dense model or a run without gate noise."""
    m = run.config.model
    if m.ffn != "moe" or not m.router_options.gate_noise:
        return {}
    from softmoe.eval.budget import calibration_batches
    from softmoe.eval.evaluate import load_corpus_split
    from softmoe.eval.noise import train_mode_active
    from softmoe.train.restore import load_model

    model, config, path = load_model(run_dir, lambda message: None)
    val = load_corpus_split(config, path, config.data.corpus, "val")
    data = calibration_batches(val.tokens, config.data.seq_len, config.data.batch_size, batches)
    on = train_mode_active(model, data, config.train.precision, noise=True)
    off = train_mode_active(model, data, config.train.precision, noise=False)
    return {"train_mode_ae_noise_on": sum(on) / len(on), "train_mode_ae_noise_off": sum(off) / len(off),
            "train_mode_ae_noise_on_per_layer": on, "train_mode_ae_noise_off_per_layer": off}


def _run_record(run: PlannedRun, run_dir: Path, payload: dict) -> dict:
    entry = payload["language_modelling"][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    m = run.config.model
    return {
        "variant": run.variant.name, "label": run.variant.label, "seed": run.seed, "run_dir": str(run_dir),
        "ffn": m.ffn, "router": m.router if m.ffn == "moe" else "dense", "k": m.k,
        "loss": entry["loss"], "perplexity": entry["perplexity"], "bits_per_byte": entry["bits_per_byte"],
        "active_experts_mean": entry["routing"]["active_experts_mean"],
        "active_experts_per_layer": [layer["active_experts_mean"] for layer in entry["routing"]["layers"]],
        "k_L": payload["model"]["k_L"], "expert_flops_per_token": entry["cost"]["expert_flops_per_token"],
        "active_params": entry["cost"]["active_params"], "tokens_per_sec": summary.get("tokens_per_sec"),
        "train_ae": summary.get("train_ae"), "train_ae_per_layer": summary.get("train_ae_per_layer"),
        "skipped_steps": summary.get("skipped_steps"),
        "expert_equivalents": _expert_equivalents(run.config, entry["cost"]["expert_flops_per_token"]),
        "causal": m.ffn != "moe" or router_class(m.router).causal,
        "granularity": m.granularity if m.ffn == "moe" else 1,
        "num_shared_experts": m.num_shared_experts if m.ffn == "moe" else 0,
        "tasks": {name: {key: result[key] for key in TASK_METRICS} for name, result in payload["tasks"].items()},
        "train_ae_last": _last_train_ae(run_dir),
        **_noise_ae(run, run_dir),
    }


def _last_train_ae(run_dir: Path) -> float | None:
    """The realized AE of the last training record (Train AE's other reading, beside the last-20% mean)."""
    rows = [r for r in read_metrics(run_dir, "train") if r.get("active_experts_mean") is not None]
    return rows[-1]["active_experts_mean"] if rows else None


def _settings(study: Study, variant: Variant) -> EvalSettings:
    """The study's evaluation, plus the variant's budget dial."""
    return dataclasses.replace(study.evaluation, budgets=variant.dial) if variant.dial else study.evaluation


def run_one(study: Study, run: PlannedRun, progress: bool = False) -> dict:
    """Train (or reuse) and evaluate one run; its compare record with curves and trajectories attached.
    With `study.summaries`, its summary is written there too (the only output that outlives the run dir)."""
    if run.config.train.threads:
        torch.set_num_threads(run.config.train.threads)  # the evaluation too, not only the Trainer
    run_dir = train_or_reuse(run.config)
    payload = _evaluate_run(run_dir, _settings(study, run.variant), progress)
    summary = build_summary(study.name, run.config.train.name, run.variant.name, run.variant.label, run.seed,
                            run.config, _run_record(run, run_dir, payload), payload, run_dir)
    if study.summaries is not None:
        path = write_summary(study.summaries, summary)
        print(f"{run.config.train.name}: summary written to {shown_path(path)}", flush=True)
    return {**record_of(summary), "run_dir": str(run_dir)}


def _end_with_parent(compare_pid: int) -> None:
    """Pool-worker initializer: on Linux the worker gets SIGTERM when the `softmoe compare` process dies, so a
    killed compare never leaves runs training on its own (each worker's Trainer checkpoints and stops; the next
    compare resumes the run). A compare that died before this took effect sends no signal: the worker then
    exits at once. Elsewhere nothing changes."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    _exit_if_orphaned(compare_pid)


def _exit_if_orphaned(compare_pid: int) -> None:
    """Leave at once when the compare that started this worker is gone (this process was re-parented)."""
    if os.getppid() != compare_pid:
        os._exit(130)


def _run_one_in_worker(args: tuple) -> dict:
    """A process-pool worker: `run_one(study, run, progress)` (its output interleaves with the other worker's).
    `args` ends with the compare's pid. A worker whose compare died (the SIGTERM above; the run is checkpointed)
    exits instead of starting or finishing anything: no parent will send it more work or read its result, and
    the pool's queue would otherwise keep it waiting forever."""
    *run_args, compare_pid = args
    _exit_if_orphaned(compare_pid)  # never start a run for a dead compare
    try:
        return run_one(*run_args)
    except KeyboardInterrupt:
        _exit_if_orphaned(compare_pid)
        raise


def _run_side_by_side(study: Study, todo: list[PlannedRun], jobs: int) -> dict[str, dict]:
    """`run_one` for each of `todo`, `jobs` at a time in worker processes; {run name: record}.

    A run is handed to a worker only when one is free, so nothing is queued behind the running runs: after a
    Ctrl-C (which reaches the workers too: each checkpoints its run and stops) or a failed run no new run starts;
    the running ones end, then the interrupt or the first error is raised."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    compare_pid = os.getpid()
    waiting, running, records = list(todo), {}, {}
    stop: BaseException | None = None
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_end_with_parent, initargs=(compare_pid,)) as pool:
        while running or (waiting and stop is None):
            while waiting and stop is None and len(running) < jobs:
                run = waiting.pop(0)
                running[pool.submit(_run_one_in_worker, (study, run, False, compare_pid))] = run
            try:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt as interrupt:
                if isinstance(stop, KeyboardInterrupt):
                    raise  # a second Ctrl-C: leave now (the workers got it too and abort)
                stop = interrupt
                print(f"interrupted: waiting for {len(running)} running run(s) to checkpoint and stop; no new run "
                      f"starts (Ctrl-C again to leave at once)", flush=True)
                continue
            for future in done:
                run = running.pop(future)
                try:
                    records[run.config.train.name] = future.result()
                except BaseException as err:  # noqa: BLE001 (a worker's KeyboardInterrupt arrives here too)
                    if stop is None and not isinstance(err, KeyboardInterrupt) and (running or waiting):
                        print(f"{run.config.train.name} failed ({type(err).__name__}); no new run starts, waiting "
                              f"for {len(running)} running run(s)", flush=True)
                    stop = stop or err
    if stop is not None:
        raise stop
    return records


def _expert_equivalents(config: RunConfig, ffn_flops: float) -> float:
    """Realized FFN FLOPs per token in units of "coarse experts per layer" (dense model: d_ff / d_expert).

    Counts shared experts and, with granularity g, fine experts as 1/g of a coarse one (d_expert is the
    coarse width), so variants compare on one compute axis."""
    m = config.model
    return ffn_flops / (m.n_layers * 2 * 3 * m.d_model * m.d_expert)


def _missing(study: Study, runs: list[PlannedRun], force: bool) -> tuple[dict[str, dict], list[PlannedRun]]:
    """({run name: record} of the runs summarised with the planned config, the runs to train and evaluate).

    Without `study.summaries` nothing is summarised and a run is to do until its run dir is finished.
    A summary that is unreadable or trained with other settings than the study now plans is a ValueError,
    unless `force`: then it is dropped (and its run redone). With `force` every run is to do; summaries not redone this
    sitting still count in the results."""
    done: dict[str, dict] = {}
    for run in runs if study.summaries is not None else []:
        name = run.config.train.name
        try:
            summary = load_summary(study.summaries, name)
            if summary is not None:
                check_summary(summary, run.config, summary_path(study.summaries, name))
        except ValueError as err:  # unreadable, or of another config
            if not force:
                raise
            print(f"--force: {err.args[0].split('; ')[0]}: dropped; its run is to redo", flush=True)
            continue
        if summary is not None:
            done[name] = record_of(summary)
    if force:
        return done, list(runs)
    if study.summaries is None:
        return done, [run for run in runs if not is_finished(run.config)]
    return done, [run for run in runs if run.config.train.name not in done]


def run_study(study: Study, extra_overrides: tuple[str, ...] = (), progress: bool = False, next_runs: int | None = None,
              force: bool = False, jobs: int = 1, mixed_revisions: bool = False) -> Path:
    """Train and evaluate the study's missing runs (all, or the next `next_runs` in plan order), then write
    the results from every run there is; returns results.md.

    `progress`: bars for data preparation and evaluation on a terminal (training's is `train.progress`).
    `force`: ignore existing summaries (their runs are evaluated and summarised again; a finished run dir
    is reused, so pass a new out_dir to retrain). `jobs` > 1: that many runs at once, each in its own
    process with one thread (train.threads=1). Runs not trained in this sitting and not summarised are
    left out of the results (a study in progress). The results refuse runs of different code revisions (and,
    for a study with `pinned_revision`, runs with local edits) unless `mixed_revisions`."""
    check_int("jobs", jobs, 1)
    check_int("next_runs", next_runs, 0, allow_none=True)
    overrides = tuple(extra_overrides) + (("train.threads=1",) if jobs > 1 else ())
    runs = plan_runs(study, overrides)
    done, missing = _missing(study, runs, force)
    todo = missing if next_runs is None else missing[:next_runs]
    print(f"study {study.name}: {len(runs)} runs planned, {len(done)} summarised, {len(missing)} "
          f"{'to redo (--force)' if force else 'missing'}; running {len(todo)} now"
          + (f", {jobs} at a time" if jobs > 1 and todo else ""), flush=True)
    reused = [run for run in runs if study.summaries is None and run not in missing]
    if todo:
        prepared_dataset_dir(runs[0].config.data, progress)  # fetch/prepare once, before any training
    records = dict(done)
    if jobs > 1 and len(todo) > 1:
        records.update(_run_side_by_side(study, todo, jobs))
    else:
        for i, run in enumerate(todo, 1):
            print(f"== [{i}/{len(todo)}] {run.config.train.name} ==", flush=True)
            records[run.config.train.name] = run_one(study, run, progress)
    for run in reused:  # finished run dirs of a study without summaries: cached evaluations
        records[run.config.train.name] = run_one(study, run, progress)
    ordered = [records[run.config.train.name] for run in runs if run.config.train.name in records]
    if not ordered:
        raise ValueError(f"study {study.name}: no run is trained or summarised yet; run it without --next 0")
    return write_results(study, runs, ordered, mixed_revisions)
