"""What a sweep's scheduler saves: grid vs random search vs ASHA vs PBT on continual_digits.yaml's search space.

    python benchmarks/bench_sweep.py                          # grid, random, ASHA, PBT (3 search seeds each)
    python benchmarks/bench_sweep.py --methods pbt            # add PBT runs to the work folder, then report
    python benchmarks/bench_sweep.py --report-only            # the table, plot and files from the runs kept
    python benchmarks/bench_sweep.py --smoke-test             # a 2x1x1 grid, 2 samples, few steps (~2 min)

Setting: `jobs/configs/continual_digits.yaml` (class-incremental split digits, 5 tasks, MLP 256-256, FIP over seeds
0-2, a trial reports after every task phase of every seed: 12 iterations), searched over path.lam x path.beta x
path.lr. Every trial trains on the training split less its held-out 20% (`sweep.validation`) and is scored on that
part (`acc_mean`, the class-incremental ACC mean over the seeds); the test split is read only to score each run's
pick afterwards. One local Ray (`num_cpus=2`) is started here and reused by every `run_sweep`; 2 trials at a time,
one torch thread each.

  grid    4 x 3 x 3 = 36 points (`GRID`), every trial full length (ASHA's grace period = the trial's length:
          its only rung is the last iteration). Deterministic: one run. Its reference numbers:
            best  the best validation score of its (full-length) trials;
            total its compute: the sum of every trial's last `grad_evals` (optimizer steps, base network
                  included), and the wall seconds of the `run_sweep` call.
  random  `BasicVariantGenerator(random_state=sweep.search_seed)` over `SPACE` (loguniform over the grid's
          bounds), `--samples` trials, every trial full length.
  asha    the same space and generator, `--asha-samples` trials, ASHA at the shipped sweep's rungs
          (grace period 2, reduction factor 3: rungs at iterations 2 and 6 of 12).
  pbt     `sweep.scheduler: pbt` (`fipray.ray.pbt`: synchronous PBT along the trials' FIP paths), the same space,
          a population of `--pbt-samples` (6, as sweep_pbt_continual_digits.yaml), every 150 path steps (twice a
          task phase) the bottom quarter takes a top trial's path with perturbed knobs. A trial's compute is what
          it ran itself (`stretch_grad_evals` of reports.jsonl: a copied path's steps count once, in the trial
          that ran them); full length = the path's last step. Its pick (`best_config.yaml`) holds the best
          trial's *final* values: the test score runs them from step 0, as `fipray continual` would, not the
          trial's schedule.

Per run, from its `reports.parquet` (every report of every trial, in time order):

  reached   a *full-length* report (iteration = the trial's last) whose `acc_mean` is within 0.5 points of the
            grid's best (>= best - 0.005). The moment of reaching is that report's Tune timestamp (whole
            seconds); the first such report in wall-clock order counts.
  compute   at that moment: the sum over all trials of the run, stopped ones included, of the last
            `grad_evals` each reported at or before that timestamp (every report of the same whole second
            counted: conservative by at most one second of work); seconds = the end of that whole second minus
            the moment `run_sweep` was called (Ray already running). Both as ratios to the grid's totals.
  picked    the run's own choice (`summary.json`: the best full-length trial, `best_config.yaml`), its
            validation score, and its test score: `best_config.yaml` run as `fipray continual --config` runs it
            (`fipray.experiments.run_experiment`; training on the whole training split, seeds 0-2, test split,
            FIP only: `continual.baselines=[]`), FIP's `acc_mean`. For PBT also `picked_val_fixed`: the final
            values' validation score as one fixed config from step 0 (a plain sweep trial).

Runs that never reach count in "reached (k of n)" only; the compute ratios are means over the runs that reached.
`--timeout` seconds per run (PBT's earlier attempt live-locked): the run is interrupted (SIGINT, Tune's own stop),
recorded as hung and skipped. Runs are kept in `--work` (one folder per method and seed, reused when run again).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "continual_digits.yaml"
TOL = 0.005  # 0.5 points of acc_mean
GRID = {"path.lam": [2.0, 7.0, 25.0, 100.0], "path.beta": [0.5, 1.0, 2.0], "path.lr": [0.0003, 0.001, 0.003]}
SPACE = {"path.lam": {"loguniform": [2.0, 100.0]}, "path.beta": {"loguniform": [0.5, 2.0]},
         "path.lr": {"loguniform": [0.0003, 0.003]}}
SMOKE_GRID = {"path.lam": [2.0, 25.0], "path.beta": [1.0], "path.lr": [0.001]}
SMOKE_CFG = {"seeds": [0], "train": {"steps": 40}, "path": {"steps": 20, "record_every": 10, "checkpoint_every": 20}}
METHODS = ("grid", "random", "asha", "pbt")
GOALS = {"asha": 0.35, "pbt": 0.2}  # the goals: compute to reach, as a fraction of the grid's
COLOURS = {"grid": "black", "random": "tab:blue", "asha": "tab:orange", "pbt": "tab:green"}


# ---- the measures: pure functions of report rows ({trial_id, full, metric, grad_evals, timestamp}, time order;
# `full`: a report at the trial's last iteration; `grad_evals`: the compute the trial itself ran so far) ----

def grid_best(rows: list[dict]) -> float:
    """The best `metric` of a full-length report."""
    done = [r["metric"] for r in rows if r["full"] and r["metric"] == r["metric"]]
    if not done:
        raise ValueError("no trial reached its last iteration")
    return max(done)


def compute_at(rows: list[dict], t: float) -> float:
    """Sum over trials of the last `grad_evals` each reported at or before timestamp `t`."""
    last: dict[str, float] = {}
    for r in rows:
        if r["timestamp"] <= t and r["grad_evals"] == r["grad_evals"]:
            last[r["trial_id"]] = max(last.get(r["trial_id"], 0.0), r["grad_evals"])
    return float(sum(last.values()))


def total_compute(rows: list[dict]) -> float:
    return compute_at(rows, math.inf)


def reach(rows: list[dict], target: float, t_start: float) -> dict | None:
    """The first full-length report with metric >= target, in time order, and the compute spent until then
    (see the module docstring); None if no full-length report reaches it."""
    hits = [r for r in rows if r["full"] and r["metric"] >= target - 1e-12]
    if not hits:
        return None
    first = min(hits, key=lambda r: r["timestamp"])
    return {"timestamp": first["timestamp"], "trial_id": first["trial_id"], "metric": first["metric"],
            "grad_evals": compute_at(rows, first["timestamp"]),
            "seconds": max(0.0, first["timestamp"] + 1 - t_start)}


def best_so_far(rows: Iterable[dict]) -> list[tuple[float, float]]:
    """(compute spent, best full-length metric so far) after every report in the given (time) order; NaN before
    the first full-length report."""
    last: dict[str, float] = {}
    best, out = math.nan, []
    for r in rows:
        if r["grad_evals"] == r["grad_evals"]:
            last[r["trial_id"]] = max(last.get(r["trial_id"], 0.0), r["grad_evals"])
        if r["full"] and (best != best or r["metric"] > best):
            best = r["metric"]
        out.append((float(sum(last.values())), best))
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x == x]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def run_measures(rows: list[dict], best: float, t_start: float, grid_evals: float, grid_seconds: float) -> dict:
    """One run's numbers against the grid's best and totals."""
    hit = reach(rows, best - TOL, t_start)
    return {"reached": hit is not None,
            "ratio_grad_evals": hit["grad_evals"] / grid_evals if hit else math.nan,
            "ratio_seconds": hit["seconds"] / grid_seconds if hit else math.nan,
            "reach": hit, "total_grad_evals": total_compute(rows),
            "total_ratio_grad_evals": total_compute(rows) / grid_evals}


def sweep_rows(reports: list[dict], max_t: int) -> list[dict]:
    """reports.parquet's rows (`grad_evals` cumulative per trial) -> the measures' rows."""
    return [{"trial_id": r["trial_id"], "full": r["iteration"] >= max_t, "metric": r["metric"],
             "grad_evals": r["grad_evals"], "timestamp": r["timestamp"]} for r in reports]


def pbt_rows(reports: list[dict], steps: int) -> list[dict]:
    """A PBT sweep's reports.jsonl rows -> the measures' rows. A trial's `grad_evals` there includes the stretches
    of a path it copied (PBT's exploit), already counted in the trial that ran them: here a trial's compute is the
    sum of its own `stretch_grad_evals`; `full` is a report at the path's last step."""
    own: dict[str, float] = {}
    out = []
    for r in sorted(reports, key=lambda r: (r["timestamp"], str(r["trial_id"]), r["training_iteration"])):
        tid = str(r["trial_id"])
        own[tid] = own.get(tid, 0.0) + float(r.get("stretch_grad_evals") or 0.0)
        out.append({"trial_id": tid, "full": float(r["path_step"]) >= steps, "metric": float(r["acc_mean"]),
                    "grad_evals": own[tid], "timestamp": float(r["timestamp"])})
    return out


# ---- the sweeps ----

def job_dict(method: str, seed: int, args: argparse.Namespace) -> dict:
    import yaml

    d = yaml.safe_load(CONFIG.read_text())
    if args.smoke_test:
        for k, v in SMOKE_CFG.items():
            d[k] = {**d[k], **v} if isinstance(v, dict) else v
    d["ray"] = {"cpus_per_path": 1}
    iters = len(d["seeds"]) * (d["continual"]["num_tasks"] - 1)
    sweep: dict = {"metric": "acc_mean", "mode": "max", "max_concurrent_trials": 2, "validation": 0.2,
                   "search_seed": seed, "name": f"{method}_{seed}", "include_base_config": False,
                   "grace_period": iters, "reduction_factor": 3}
    grid = SMOKE_GRID if args.smoke_test else GRID
    if method == "grid":
        sweep.update(search={k: {"grid": v} for k, v in grid.items()}, num_samples=1)
    else:
        sweep.update(search=SPACE, num_samples={"random": args.samples, "asha": args.asha_samples,
                                                "pbt": args.pbt_samples}[method])
    if method == "asha":
        sweep.update(grace_period=min(2, iters), reduction_factor=3)
    if method == "pbt":
        sweep.update(scheduler="pbt", perturbation_interval=args.perturbation_interval,
                     pbt_quantile=0.25, resample_probability=0.25)
    d["sweep"] = sweep
    return d


class Watchdog:
    """Interrupts the main thread's `run_sweep` after `seconds` (SIGINT: Tune stops its trials and returns),
    and ends the process if that does not work within `grace` seconds."""

    def __init__(self, seconds: float, grace: float = 90.0):
        self.fired = False
        self._done = threading.Event()
        self._t = threading.Thread(target=self._watch, args=(seconds, grace), daemon=True)

    def _watch(self, seconds: float, grace: float) -> None:
        if self._done.wait(seconds):
            return
        self.fired = True
        print(f"bench_sweep: run exceeded {seconds:.0f} s, interrupting it", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        if not self._done.wait(grace):
            print("bench_sweep: run did not stop; exiting (finished runs are kept)", file=sys.stderr, flush=True)
            os._exit(3)

    def __enter__(self) -> Watchdog:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    """One sweep into `<work>/<method>_<seed>` (kept; redone if it failed without hanging)."""
    from fipray.job import job_from_dict
    from fipray.ray.sweep import run_sweep

    folder = args.work / f"{method}_{seed}"
    meta_file = folder / "bench.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if not meta["error"] or meta["hung"]:
            return meta
    if folder.exists():
        shutil.rmtree(folder)
    job = job_from_dict(job_dict(method, seed, args))
    load0 = os.getloadavg()[0]
    t_start = time.time()
    error = None
    with Watchdog(args.timeout) as dog:
        try:
            summary = run_sweep(job, folder, progress=False)
        except (Exception, KeyboardInterrupt) as e:  # a hung run is stopped with SIGINT
            summary, error = {}, f"{type(e).__name__}: {e}"[:500]
    wall = time.time() - t_start
    meta = {"method": method, "seed": seed, "t_start": t_start, "wall": wall, "summary": summary,
            "hung": dog.fired, "error": error, "load_start": load0, "load_end": os.getloadavg()[0],
            "folder": str(folder)}
    print(f"{method} seed {seed}: {wall:.0f} s, {summary.get('num_trials')} trials, best "
          f"{summary.get('best_metric')}" + (f", {error}" if error else ""), flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta, indent=1, default=str))
    return meta


def run_sweeps(args: argparse.Namespace) -> None:
    import ray

    from fipray.ray.cluster import quiet_ray

    # reports.parquet is read from each trial's result files (`Result.metrics_dataframe`), which quiet_ray's
    # default (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1) leaves unwritten: without this, reports.parquet is empty.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"
    quiet_ray()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024**2, logging_level=logging.ERROR)
    try:
        for method in args.methods:
            for seed in ([0] if method == "grid" else args.seeds):
                if method == "pbt" and not (ROOT / "fipray" / "ray" / "pbt.py").exists():
                    print("bench_sweep: fipray/ray/pbt.py does not exist; PBT skipped", file=sys.stderr)
                    break
                run_one(method, seed, args)
    finally:
        ray.shutdown()


# ---- the report ----

def load_runs(work: Path) -> list[dict]:
    runs = []
    for f in sorted(work.glob("*/bench.json")):
        meta = json.loads(f.read_text())
        meta["rows"] = [] if meta["error"] else run_rows(f.parent, meta["summary"])
        runs.append(meta)
    return runs


def run_rows(folder: Path, summary: dict) -> list[dict]:
    """A finished run's rows for the measures: PBT's from reports.jsonl (own compute per trial), the others'
    from reports.parquet."""
    import pyarrow.parquet as pq

    if summary.get("scheduler") == "pbt":
        lines = (folder / "reports.jsonl").read_text().splitlines()
        return pbt_rows([json.loads(x) for x in lines if x.strip()], int(summary["pbt"]["path_steps"]))
    return sweep_rows(pq.read_table(folder / "reports.parquet").to_pylist(), int(summary["max_iterations"]))


def test_score(best_config: Path, cache: Path) -> float:
    """FIP's test acc_mean of a picked config, run as `fipray continual --config best_config.yaml` runs it
    (FIP only); cached by the config's run id."""
    from fipray.config import load_config
    from fipray.experiments import run_experiment

    cfg = load_config(best_config, ["continual.baselines=[]"])
    out = cache / cfg.run_id()
    if (out / "summary.json").exists():
        return float(json.loads((out / "summary.json").read_text())["methods"]["fip"]["acc_mean"])
    return float(run_experiment(cfg, out, progress=False)["methods"]["fip"]["acc_mean"])


def fixed_val_score(folder: Path, cache: Path) -> float:
    """The validation score of a run's `best_config.yaml` run as one fixed config (a sweep trial from step 0:
    for PBT, its final values without the schedule that produced its score); cached by the config's run id."""
    from fipray.config import load_config
    from fipray.job import load_job
    from fipray.units import run_trial

    cfg = load_config(folder / "best_config.yaml")
    f = cache / f"{cfg.run_id()}.json"
    if not f.exists():
        reports: list[dict] = []
        run_trial(cfg, reports.append, **load_job(folder / "job.yaml").sweep.options())
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(reports[-1]))
    return float(json.loads(f.read_text())["acc_mean"])


def measure(runs: list[dict], work: Path) -> tuple[dict, list[dict]]:
    grid = next((r for r in runs if r["method"] == "grid" and r["rows"]), None)
    if grid is None:
        raise SystemExit(f"no finished grid run in {work}: run the grid first")
    ref = {"best": grid_best(grid["rows"]), "grad_evals": total_compute(grid["rows"]), "seconds": grid["wall"],
           "num_trials": grid["summary"]["num_trials"]}
    out = []
    for r in runs:
        row = {k: r[k] for k in ("method", "seed", "wall", "hung", "error", "load_start", "load_end")}
        if r["rows"]:
            s = r["summary"]
            row.update(run_measures(r["rows"], ref["best"], r["t_start"], ref["grad_evals"], ref["seconds"]))
            row.update(picked=s["best_config"], picked_val=s["best_metric"], num_trials=s["num_trials"],
                       num_stopped_early=s["num_stopped_early"], total_ratio_seconds=r["wall"] / ref["seconds"],
                       picked_test=test_score(Path(r["folder"]) / "best_config.yaml", work / "test"))
            if r["method"] == "pbt":
                row["picked_val_fixed"] = fixed_val_score(Path(r["folder"]), work / "val")
        out.append(row)
    return ref, out


def _pm(xs: list[float], digits: int = 3) -> str:
    m, s = mean_std(xs)
    return "—" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}"


def table(ref: dict, rows: list[dict]) -> str:
    head = ("| method | ratio grad evals | ratio seconds | reached | picked val | picked test | whole sweep grad evals "
            "| whole sweep seconds |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for m in METHODS:
        sel = [r for r in rows if r["method"] == m]
        if not sel:
            continue
        ok = [r for r in sel if "reached" in r]
        got = [r for r in ok if r["reached"]]
        hung = sum(bool(r["hung"] or r["error"]) for r in sel)
        lines.append(f"| {m} | {_pm([r['ratio_grad_evals'] for r in got])} | {_pm([r['ratio_seconds'] for r in got])} "
                     f"| {len(got)} of {len(sel)}" + (f" ({hung} hung/failed)" if hung else "") +
                     f" | {_pm([r['picked_val'] for r in ok], 4)} | {_pm([r['picked_test'] for r in ok], 4)} "
                     f"| {_pm([r['total_ratio_grad_evals'] for r in ok])} | {_pm([r['total_ratio_seconds'] for r in ok])} |")
    return head + "\n".join(lines) + "\n"


def plot(ref: dict, runs: list[dict], path: Path) -> None:
    from fipray.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.axhspan(ref["best"] - TOL, ref["best"] + TOL, color="grey", alpha=0.25, label="grid best ± 0.5 pt")
    seen = set()
    for r in sorted(runs, key=lambda r: METHODS.index(r["method"])):
        pts = [(c / ref["grad_evals"], b) for c, b in best_so_far(r["rows"]) if b == b]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        m = r["method"]
        ax.step(xs, ys, where="post", color=COLOURS[m], alpha=0.8, lw=1.2, label=None if m in seen else m)
        seen.add(m)
    for m, goal in GOALS.items():
        ax.axvline(goal, color=COLOURS[m], ls=":", lw=1, label=f"{m} goal ({goal:g})")
    ax.set_xscale("log")
    ax.set_xlabel("compute: grad evals / grid's total")
    ax.set_ylabel("best full-length val acc_mean")
    bests = [b for r in runs for _, b in best_so_far(r["rows"]) if b == b] or [ref["best"]]
    ax.set_ylim(max(min(bests), ref["best"] - 0.08) - 0.005, max(max(bests), ref["best"]) + 0.01)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("best-so-far validation score vs compute", fontsize=9)
    save_figure(fig, path)


def report(args: argparse.Namespace) -> dict:
    runs = load_runs(args.work)
    ref, rows = measure(runs, args.work)
    text = table(ref, rows)
    print(f"grid: best val acc_mean {ref['best']:.4f} of {ref['num_trials']} trials, {ref['grad_evals']:.0f} grad "
          f"evals, {ref['seconds']:.0f} s\n" + text)
    res = Path(args.results)
    img = Path(args.img)
    res.mkdir(parents=True, exist_ok=True)
    img.parent.mkdir(parents=True, exist_ok=True)
    plot(ref, runs, img)
    out = {"reference": ref, "runs": rows, "table": text, "machine": platform.machine(), "cpus": os.cpu_count(),
           "command": "python " + " ".join(sys.argv), "grid": GRID, "space": SPACE, "smoke_test": args.smoke_test}
    (res / "bench_sweep.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="search seeds (random, asha, pbt)")
    ap.add_argument("--samples", type=int, default=12, help="random search's trials")
    ap.add_argument("--asha-samples", type=int, default=24)
    ap.add_argument("--pbt-samples", type=int, default=6, help="PBT's population")
    ap.add_argument("--perturbation-interval", type=int, default=150, help="PBT: path steps")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is interrupted")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_sweep")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--img", default=str(ROOT / "docs" / "img" / "bench_sweep.png"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--smoke-test", "--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke_test:
        args.seeds, args.samples, args.asha_samples, args.pbt_samples = args.seeds[:1], 2, 2, 2
        args.perturbation_interval = 10
        if args.work == ROOT / "runs" / "bench_sweep":
            args.work = ROOT / "runs" / "bench_sweep_smoke"
        args.results, args.img = str(args.work), str(args.work / "bench_sweep.png")
    args.work = args.work.resolve()
    if not args.report_only:
        run_sweeps(args)
    return report(args)


if __name__ == "__main__":
    main()
