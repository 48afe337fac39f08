"""Adversarial evaluation of a served, sharded ensemble through Ray handles (``fipray attack``).

:class:`RemoteEnsemble` presents the Serve app's ingress as an ``nn.Module`` returning log(mean
softmax). Its forward asks the ingress for the shards' log softmax sums; its backward sends the
upstream gradient back, and the ingress assembles the exact input gradient from the shards'
vector-Jacobian products (``fipray.serving``). Any torch code can therefore attack the
sharded ensemble as if it were in-process: the attack command reuses ``fipray.eval.robustness``
unchanged (torchattacks PGD, the ε curve, the sanity flags), so its table matches ``fipray ensemble``'s
for the same seed, ε, steps and examples.

The ensemble may be named by a URI (``s3://``, ``gs://``: e.g. ``<storage>/merged/ensemble`` of ``fipray paths``
on a cluster): it is copied into this node's cache and verified whole before Ray starts
(:func:`fipray.ensemble_folder.fetch_ensemble`), each replica reads its own node's copy, and the run config
defaults to ``<storage>/config.yaml`` (two levels up, as beside a local folder).

This module does not import Ray at import time; :func:`main_attack` does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fipray.uri import UriError, cached_file, display, is_remote, is_uri


class _RemoteLogProbs(torch.autograd.Function):
    """log p(x) from the ingress; backward = the ingress's assembled VJP."""

    @staticmethod
    def forward(ctx, x: Tensor, handle: Any) -> Tensor:  # type: ignore[override]
        xc = x.detach().cpu()
        logp, parts = handle.log_probs_parts.remote(xc).result()
        ctx.handle, ctx.x, ctx.parts = handle, xc, parts
        return logp.to(x.device)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        grad = ctx.handle.vjp.remote(ctx.x, g.detach().cpu(), ctx.parts).result()
        return grad.to(g.device), None


class RemoteEnsemble(nn.Module):
    """The served ensemble as a module: ``(B, *input_shape)`` in [0, 1] -> log(mean softmax) ``(B, C)``.

    Args:
        handle: A Serve ``DeploymentHandle`` of ``EnsembleIngress`` (anything whose methods
            ``log_probs_parts`` and ``vjp`` have ``.remote(...).result()``).

    Gradients flow to the input only (the members live in the shards). A zero-size parameter keeps
    the module's device discoverable (torchattacks reads it from ``model.parameters()``).
    """

    def __init__(self, handle: Any):
        super().__init__()
        self.handle = handle
        self._device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _RemoteLogProbs.apply(x, self.handle)
        logp, _ = self.handle.log_probs_parts.remote(x.detach().cpu()).result()
        return logp.to(x.device)


def _find_config(ensemble: str, folder: Path, config: Path | None, config_hash: str | None):
    """The run config that made the ensemble: ``--config`` or ``<run>/config.yaml`` two levels up (a URI too)."""
    from fipray.config import ConfigError, load_config

    path = config if config is not None else _run_config(ensemble, folder)
    if path is None or not path.is_file():
        where = display(_run_config_uri(ensemble) or ensemble) if config is None and is_remote(ensemble) else path
        raise ConfigError(
            f"no run config at {where}; pass --config (the config `fipray ensemble` ran with) so the "
            "attack uses the same data, examples, steps and ε"
        )
    cfg = load_config(path)
    if config is None and config_hash and cfg.run_id() != config_hash:
        raise ConfigError(f"{path} has run id {cfg.run_id()} but the ensemble was made by run {config_hash} "
                          f"(pass --config {path} to use it anyway, e.g. after config defaults changed)")
    return cfg


def _run_config_uri(ensemble: str) -> str | None:
    """``<run>/config.yaml`` of an ensemble URI ``.../<run>/<a>/<b>`` (query options kept), None if too shallow."""
    base, _, query = ensemble.partition("?")
    scheme, _, rest = base.partition("://")
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 3:  # bucket/a/b at least: the run folder must lie inside the bucket
        return None
    return f"{scheme}://{'/'.join(parts[:-2])}/config.yaml" + (f"?{query}" if query else "")


def _run_config(ensemble: str, folder: Path) -> Path | None:
    """The local path of the run config beside the ensemble (a URI's: fetched into the node cache), or None."""
    if not is_remote(ensemble):
        return folder.resolve().parents[1] / "config.yaml"
    uri = _run_config_uri(ensemble)
    if uri is None:
        return None
    try:
        return cached_file(uri)
    except UriError:
        return None


def attack_table(rows: list[dict], flags: dict, reference: list[dict] | None) -> str:
    """Markdown: the robustness rows (with ``fipray ensemble``'s numbers beside them when known) and flags."""
    from fipray import report
    from fipray.eval.robustness import NOT_EVALUATED, flag_verdict

    header = ["ε", "clean", "white-box", "transfer", "steps", "n"]
    ref = {round(r["eps"], 9): r for r in reference or []}
    if ref:
        header += ["white-box (fipray ensemble)", "transfer (fipray ensemble)"]
    table = []
    for r in rows:
        row = [r["eps"], r["clean"], r["whitebox"], r["transfer"], r["steps"], r["n"]]
        if ref:
            m = ref.get(round(r["eps"], 9))
            row += [m["whitebox"], m["transfer"]] if m else ["-", "-"]
        table.append(row)
    skipped = flags["measured"].get("not_evaluated") or {"flags": [], "reason": ""}
    flag_rows = [[k, flag_verdict(v, k in skipped["flags"])] for k, v in flags["flags"].items()]
    note = [f"Flags {NOT_EVALUATED}: {skipped['reason']}.", ""] if skipped["flags"] else []
    return "\n".join([report.md_table(header, table), "", "## Sanity flags", "",
                      report.md_table(["flag", "verdict"], flag_rows), "", *note])


def main_attack(
    ensemble: str | Path,
    *,
    eps: Sequence[float] | None = None,
    shards: int = 1,
    steps: int | None = None,
    seed: int | None = None,
    examples: int | None = None,
    config: str | Path | None = None,
    surrogate: str | Path | None = None,
    out: str | Path | None = None,
    address: str | None = None,
    flags: bool = True,
) -> dict:
    """``fipray attack``: white-box and transfer PGD on the sharded ensemble through Ray handles.

    Defaults (ε list, PGD steps, number of examples, seed) come from the run config that made the
    ensemble, so that the numbers are comparable with that run's ``robustness.parquet``. The transfer
    surrogate is ``surrogate`` (an ensemble folder, evaluated in-process) or, by default, the run's
    base network w0 retrained deterministically from the config (as ``fipray ensemble`` trained it).

    Returns:
        The summary written to ``out/summary.json``.
    """
    from fipray import runtime as common

    t_start = time.perf_counter()
    s = _resolve_settings(str(ensemble), config=config, eps=eps, shards=shards, steps=steps, seed=seed,
                          examples=examples)
    if s.cfg.threads:
        torch.set_num_threads(s.cfg.threads)

    dev = torch.device("cpu")
    bundle = common.load_bundle(s.cfg)
    xte, yte = common.tensors(bundle.test, dev)
    if not xte.is_floating_point():
        from fipray.config import ConfigError

        raise ConfigError(f"fipray attack perturbs images in [0, 1]; {s.cfg.data.name!r} holds token ids "
                          f"({xte.dtype}): text ensembles are served for predictions only")
    x_eval, y_eval = xte[:s.examples], yte[:s.examples]
    t0 = time.perf_counter()
    sur, surrogate_name = _build_surrogate(s.cfg, bundle, surrogate, s.seed, dev)
    surrogate_seconds = time.perf_counter() - t0

    rows, fl, deploy_seconds, curve_seconds = _served_attack(
        s.ensemble, s, shards=shards, address=address, x_eval=x_eval, y_eval=y_eval, surrogate=sur, flags=flags)

    reference = None if is_remote(s.ensemble) else _reference_rows(s.folder, s.seed, rows)
    summary = _summary(s, shards=shards, n_eval=len(x_eval), surrogate_name=surrogate_name, rows=rows,
                       fl=fl, reference=reference,
                       seconds={"surrogate": surrogate_seconds, "deploy": deploy_seconds, "curve": curve_seconds,
                                "total": time.perf_counter() - t_start})
    if out is None:
        out = Path("runs") / f"attack-{s.cfg.run_id()}-seed{s.seed}-s{shards}"
    md = _attack_report(s, shards=shards, n_eval=len(x_eval), surrogate_name=surrogate_name,
                        rows=rows, fl=fl, reference=reference)
    _write_outputs(Path(out), summary, md, rows, s.seed)
    return summary


@dataclass(frozen=True)
class _Settings:
    """The attack's settings once the run config's defaults have filled in what was not given."""

    ensemble: str  # the folder or URI as given
    folder: Path  # its local copy (a URI's: this node's cache)
    meta: dict
    cfg: Any
    seed: int
    eps: list[float]
    steps: int
    examples: int


def _resolve_settings(ensemble: str, *, config: str | Path | None, eps: Sequence[float] | None, shards: int,
                      steps: int | None, seed: int | None, examples: int | None) -> _Settings:
    """Fill unset options from the ensemble's run config and validate them, before any expensive work.

    Raises:
        ConfigError: an empty or negative ε list, fewer than one step or example, or more shards than
            members (from ``split_members``).
        UriError: a URI that cannot be read or whose folder fails verification (one line naming it).
    """
    from fipray.config import ConfigError
    from fipray.ensemble_folder import fetch_ensemble
    from fipray.serving import split_members

    # A folder (or URI) that cannot be served fails here, in seconds, before Ray starts.
    folder, meta = fetch_ensemble(ensemble)
    info = meta.get("metadata", {})
    cfg = _find_config(ensemble, folder, None if config is None else Path(config), info.get("config_hash"))
    seed = int(info.get("seed", cfg.seeds[0]) if seed is None else seed)
    eps_list = [float(e) for e in (cfg.ensemble.eps if eps is None else eps)]
    if not eps_list or any(not e >= 0 for e in eps_list):
        raise ConfigError(f"--eps must list radii >= 0, got {eps_list}")
    steps = int(cfg.ensemble.pgd_steps if steps is None else steps)
    n_examples = int(cfg.ensemble.eval_examples if examples is None else examples)
    if steps < 1 or n_examples < 1:
        raise ConfigError(f"--steps and --examples must be >= 1, got {steps} and {n_examples}")
    split_members(meta["num_members"], shards)  # too many shards fails before any work
    return _Settings(ensemble=ensemble, folder=folder, meta=meta, cfg=cfg, seed=seed, eps=eps_list, steps=steps, examples=n_examples)


def _build_surrogate(cfg: Any, bundle: Any, surrogate: str | Path | None, seed: int,
                     dev: torch.device) -> tuple[nn.Module, str]:
    """The transfer attack's surrogate and its name for the report.

    Without ``surrogate``, w0 is retrained from the config with the run's seed, which reproduces the
    network ``fipray ensemble`` crafted its transfer examples on, so the transfer numbers match.
    """
    from fipray.baselines.ensemble import train_w0
    from fipray.ensemble_folder import fetch_ensemble, load_ensemble
    from fipray.runtime import RunContext

    if surrogate is not None:
        return load_ensemble(fetch_ensemble(surrogate)[0]), f"ensemble {_shown(str(surrogate))}"
    ctx = RunContext.create(cfg, bundle=bundle, device=str(dev))
    sur = ctx.model(seed)
    train_w0(ctx, sur, seed)  # as `fipray ensemble` trained it (robust.start: adversarial included)
    sur.eval()
    return sur, "base network w0 (retrained from the run config)"


def _served_attack(ensemble: str, s: _Settings, *, shards: int, address: str | None, x_eval: Tensor,
                   y_eval: Tensor, surrogate: nn.Module, flags: bool) -> tuple[list[dict], dict, float, float]:
    """Serve the ensemble on Ray, run the ε curve (and sanity flags) against it, then tear it down.

    Returns:
        ``(rows, flags, deploy_seconds, curve_seconds)``.
    """
    import ray
    from ray import serve

    from fipray.eval.robustness import (
        SANITY_FLAGS,
        mark_not_evaluated,
        robustness_curve,
        sanity_flags,
        smoke_size,
    )
    from fipray.ray.local import init_local
    from fipray.ray.serve import start

    started = not ray.is_initialized()  # the Ray this call starts, it also stops
    init_local(address=address)
    app = "fipray-attack"
    try:
        t0 = time.perf_counter()
        handle = start({"ensemble": ensemble, "shards": shards, "name": app}, http=False)
        deploy_seconds = time.perf_counter() - t0
        target = RemoteEnsemble(handle)
        t0 = time.perf_counter()
        rows = robustness_curve(target, x_eval, y_eval, s.eps, surrogate=surrogate, steps=s.steps, seed=s.seed,
                                alpha=s.cfg.ensemble.pgd_alpha or None)
        curve_seconds = time.perf_counter() - t0
        fl = (sanity_flags(rows, target=target, x=x_eval, y=y_eval, eps=max(s.eps), seed=s.seed) if flags
              else mark_not_evaluated({"flags": {}, "measured": {}}, "not computed in a smoke test", SANITY_FLAGS))
        smoke = smoke_size(len(x_eval), s.steps)  # as `fipray ensemble` judges its own flags
        if flags and smoke:
            fl = mark_not_evaluated(fl, smoke)
    finally:
        serve.delete(app)
        if started:
            ray.shutdown()
    return rows, fl, deploy_seconds, curve_seconds


def _summary(s: _Settings, *, shards: int, n_eval: int, surrogate_name: str, rows: list[dict],
             fl: dict, reference: list[dict] | None, seconds: dict) -> dict:
    """The run's summary: settings, the ε rows, sanity flags, ``fipray ensemble``'s rows and timings."""
    return {
        "operation": "attack", "ensemble": _shown(s.ensemble), "members": s.meta["num_members"],
        "shards": shards, "seed": s.seed, "eps": s.eps, "pgd_steps": s.steps, "eval_examples": n_eval,
        "surrogate": surrogate_name, "rows": rows, "sanity": fl["flags"], "sanity_measurements": fl["measured"],
        "reference_rows": reference, "config_run_id": s.cfg.run_id(), "seconds": seconds,
    }


def _attack_report(s: _Settings, *, shards: int, n_eval: int, surrogate_name: str,
                   rows: list[dict], fl: dict, reference: list[dict] | None) -> str:
    """The Markdown report: what was attacked and how, then the table and the sanity flags."""
    return "\n".join([
        f"# Attack on the served ensemble {_shown(s.ensemble)} ({s.meta['num_members']} members, {shards} shard(s))", "",
        f"PGD with {s.steps} steps and random start, seed {s.seed}; white-box through the shards (input gradient "
        f"assembled from the shards' VJPs); transfer crafted on the {surrogate_name}. {n_eval} test examples.",
        "", attack_table(rows, fl, reference)])


def _write_outputs(out: Path, summary: dict, md: str, rows: list[dict], seed: int) -> None:
    """Write ``robustness.parquet``, ``summary.json`` and ``report.md``; add ``report`` and ``out`` to ``summary``.

    ``report`` and ``out`` are added after ``summary.json`` is written, so the file does not carry them.
    """
    from fipray.atomic import atomic_write_json, atomic_write_text, write_parquet

    write_parquet(out / "robustness.parquet", [{"method": "served", "seed": seed, **r} for r in rows])
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", md)
    summary["report"] = md
    summary["out"] = str(out)


def _reference_rows(ens_dir: Path, seed: int, rows: list[dict]) -> list[dict] | None:
    """``fipray ensemble``'s own FIP rows for this seed, when its ``robustness.parquet`` is beside the ensemble."""
    path = ens_dir.resolve().parents[1] / "robustness.parquet"
    method = ens_dir.resolve().name.removesuffix(f"_seed{seed}")
    if method not in ("fip", "fip_robust") or not path.is_file():
        return None
    import pyarrow.parquet as pq

    ref = [r for r in pq.read_table(path).to_pylist() if r.get("method") == method and r.get("seed") == seed]
    steps = {r["steps"] for r in rows}
    # One random start, as served: the run's rows with restarts are a stronger attack, not a reference.
    ref = [r for r in ref if r.get("steps") in steps and r.get("restarts", 1) in (1, None)]
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in ref] or None


def _shown(ensemble: str) -> str:
    """The ensemble as reported: a URI without credentials or query options, a local folder absolute."""
    return display(ensemble) if is_uri(ensemble) else str(Path(ensemble).resolve())


def format_brief(summary: dict) -> str:
    return json.dumps({f"{r['eps']:g}": {"whitebox": r["whitebox"], "transfer": r["transfer"]}
                       for r in summary["rows"]})
