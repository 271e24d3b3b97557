"""Expand a benchmark grid into models and cells, and run them: on a local process pool (``jobs``
workers, a fresh process per cell), inline in this process, or on Ray (``ray_address``: 'local'
starts a local instance, else a cluster address).

Phase 1 trains the distinct models (in parallel with one another) and writes their 'none'
records; phase 2 fans the defense cells out over the cached models. Results stream back as they
finish; each task writes its own record, so the order never matters.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict

from .bench import RunOptions, cell_task, model_task
from .errors import NFTError
from .io import atomic_write_json
from .records import BENIGN, NO_DEFENSE, CellSpec, ModelSpec, has_record, parse_defense
from .registry import ATTACKS, DEFENSES


def expand_grid(base: ModelSpec, attacks: list[str], defenses: list[str], seeds: list[int],
                clean_sizes: list[int], sets: dict[str, dict] | None = None, benign: bool = True):
    """(models, cells, save_ids): every (attack incl. Benign) x seed model, every model x defense x
    clean size cell, and the ids of the cells whose purified model is kept (first seed, first size).

    ``sets`` maps a scope to overrides: an attack name -> attack kwargs; a defense name ('nft') or
    spec ('nft:paper') -> defense settings (the spec's own overrides win).
    """
    sets = sets or {}
    attacks = [a.strip().lower() for a in attacks if a.strip()]
    if benign and BENIGN not in attacks:
        attacks.insert(0, BENIGN)
    for a in attacks:
        if a != BENIGN:
            ATTACKS.get(a)
    specs = [d.strip() for d in defenses if d.strip() and d.strip() != NO_DEFENSE]
    for d in specs:
        _check_defense(d)
    scopes = set(attacks) | set(specs) | {parse_defense(d)[0] for d in specs}
    stray = sorted(set(sets) - scopes)
    if stray:
        raise NFTError(f"--set scope(s) {stray} match no attack or defense of this grid")
    if not seeds or not clean_sizes:
        raise NFTError("give at least one seed and one clean-set size")
    models = [ModelSpec(**dict(asdict(base), attack=a, seed=s, attack_kwargs=_attack_kwargs(a, sets)))
              for a in attacks for s in seeds]
    cells, save_ids = [], set()
    for m in models:
        for d in specs:
            dset = {**sets.get(parse_defense(d)[0], {}), **sets.get(d, {})}
            for n in clean_sizes:
                c = CellSpec(model=m, defense=d, defense_set=dset, clean_per_class=n)
                cells.append(c)
                if m.seed == seeds[0] and n == clean_sizes[0]:
                    save_ids.add(c.cell_id)
    # seed-major, Benign last within a seed: a grid stopped early still has whole tables for its first seeds
    cells.sort(key=lambda c: (seeds.index(c.model.seed), c.model.attack == BENIGN, attacks.index(c.model.attack)))
    return models, cells, save_ids


def _attack_kwargs(attack: str, sets: dict[str, dict]) -> dict:
    """The --set overrides of ``attack`` over its class's ``spec_defaults`` (see nft.attacks.base.Attack)."""
    pinned = {} if attack == BENIGN else ATTACKS.get(attack).spec_defaults
    return {**pinned, **sets.get(attack, {})}


def _check_defense(spec: str) -> None:
    name, variant = parse_defense(spec)
    DEFENSES.get(name)
    if name == "nft" and variant is not None:
        from .purify import RECIPES

        if variant not in RECIPES:
            raise NFTError(f"unknown NFT recipe {variant!r} in {spec!r}; choices: {sorted(RECIPES)}")


def _executor(tasks: list[tuple], jobs: int, ray_address: str | None, opts: RunOptions, inline: bool = False):
    """Yield each task's result as it finishes. A task is (function, *args).

    By default every task runs in a fresh worker process (``jobs`` at a time), so the peak memory a
    cell reports is its own; ``inline`` runs them one by one in this process (faster start, but on
    CPU the memory figures are then relative to what earlier cells left allocated).
    """
    if ray_address:
        yield from _ray(tasks, ray_address, jobs, opts)
    elif inline:
        for fn, *args in tasks:
            yield fn(*args)
    elif tasks:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1)
        try:
            futures = [pool.submit(fn, *args) for fn, *args in tasks]
            for f in as_completed(futures):
                yield f.result()
        except BaseException:  # Ctrl-C, SIGTERM, a failed result, a caller that stops early
            _stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _stop_workers(pool) -> None:
    """Terminate the pool's running cells: otherwise the interpreter waits for them at exit, and an
    interrupted bench hangs until its current cell (ANP: many minutes) finishes. The cells they were
    running leave no record (records are written atomically) and run again on resume."""
    stop = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if stop is not None:
        stop()
        return
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        if p.is_alive():
            p.terminate()
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        p.join(5)


def _ray(tasks, address: str, jobs: int, opts: RunOptions):
    try:
        import ray
    except ImportError:
        raise NFTError("--ray needs Ray: pip install 'nft[ray]'") from None
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=max(1, jobs) * (opts.threads or 1), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    gpus = 1 if opts.device.startswith("cuda") else 0
    remotes = {}
    refs = []
    for fn, *args in tasks:
        if fn not in remotes:
            remotes[fn] = ray.remote(num_cpus=opts.threads or 1, num_gpus=gpus)(fn)
        refs.append(remotes[fn].remote(*args))
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        yield ray.get(done[0])


def run_grid(root: str, models: list[ModelSpec], cells: list[CellSpec], save_ids: set, opts: RunOptions,
             jobs: int = 1, ray_address: str | None = None, command: list[str] | None = None, log=print,
             inline: bool = False) -> dict:
    """Run what is not yet recorded under ``root``; returns counts of done/skipped/failed cells."""
    root = os.path.abspath(root)
    os.makedirs(os.path.join(root, "records"), exist_ok=True)
    t0 = time.time()
    info = _grid_info(root, models, cells, opts, jobs, ray_address, command, inline)
    o = asdict(opts)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    total = len(models) + len(cells)
    k = 0
    phases = [
        [(model_task, root, asdict(m), o) for m in models
         if not has_record(root, CellSpec(model=m, defense=NO_DEFENSE, clean_per_class=None).cell_id)],
        [(cell_task, root, asdict(c), o, c.cell_id in save_ids) for c in cells if not has_record(root, c.cell_id)],
    ]
    skipped = total - len(phases[0]) - len(phases[1])
    counts["skipped"] = skipped
    if skipped:
        log(f"skipping {skipped} finished cell(s) of {total}")
    k = skipped
    for tasks in phases:
        for res in _executor(tasks, jobs, ray_address, opts, inline):
            k += 1
            counts[res["status"]] += 1
            if res["status"] == "done":
                asr = "-" if res["asr"] is None else f"{res['asr']:.2f}"
                log(f"[{k}/{total}] {res['cell_id']}: ACC {res['acc']:.2f} ASR {asr} ({res['wall']:.0f} s)")
            elif res["status"] == "failed":
                log(f"[{k}/{total}] {res['cell_id']}: FAILED {res['error']} (see errors/{res['cell_id']}.txt)")
    info["invocations"][-1].update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), wall_seconds=time.time() - t0,
                                   counts=counts)
    atomic_write_json(info, os.path.join(root, "bench.json"))
    return counts


def _grid_info(root, models, cells, opts, jobs, ray_address, command, inline) -> dict:
    import json

    path = os.path.join(root, "bench.json")
    info = {"invocations": []}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, json.JSONDecodeError):
            print(f"nft: warning: {path} unreadable; starting a new one", file=sys.stderr)
    info.setdefault("invocations", []).append({
        "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jobs": jobs, "ray": ray_address,
        "inline": inline,
        "options": asdict(opts), "models": len(models), "cells": len(models) + len(cells)})
    info["main_clean_per_class"] = cells[0].clean_per_class if cells else None
    atomic_write_json(info, path)
    return info
