"""Metric-constrained step (eq. 4 solved on ‖dw‖ = ε) vs the penalty step, at equal wall time.

    python benchmarks/bench_metric_step.py                    # digits MLP, 20 s per method (the note's numbers)
    python benchmarks/bench_metric_step.py --smoke-test       # a few seconds

Setting: digits, MLP 256-256, base network trained on classes 0-4 (task A); the secondary
objective is the cross-entropy of classes 5-9 (task B); invariance on a replay memory of 100
task-A inputs; output drift measured (Bhattacharyya to w0) on held-out task-A test inputs. Both
methods run in alternating time slices (so machine load hits both alike) until each has used
`--budget` seconds. Prints, per method, from one run on one machine:

  drift / length     held-out output drift per unit of weight distance travelled (FIP length)
  drift / straight   the same per unit of straight distance ‖w − w0‖
  ce_B drop          secondary-objective progress: task-B cross-entropy at w0 minus at the end
  acc_A, acc_B       test accuracy on each task (argmax over all 10 classes)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch
import torch.nn.functional as F

from fipray.core.distances import get_distance
from fipray.core.step import Anchor, metric_step, penalty_step
from fipray.data import as_tensors, get_data
from fipray.data.batches import BatchStream
from fipray.models import create_model


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=20.0, help="wall seconds per method")
    ap.add_argument("--slice", type=float, default=0.5, help="seconds per alternating slice")
    ap.add_argument("--lam", type=float, default=10.0)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3, help="penalty step: Adam learning rate")
    ap.add_argument("--radii", default="0.05,0.2", help="metric step: trust radii ε, comma-separated")
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke_test:
        args.budget, args.slice = 2.0, 0.25
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = get_data("digits")
    xtr, ytr = as_tensors(data.train)
    xte, yte = as_tensors(data.test)
    a_tr, b_tr = ytr < 5, ytr >= 5
    a_te, b_te = yte < 5, yte >= 5
    xa, ya, xb, yb = xtr[a_tr], ytr[a_tr], xtr[b_tr], ytr[b_tr]
    base = create_model("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[256, 256])
    opt = torch.optim.Adam(base.parameters(), lr=1e-3)
    stream = BatchStream(len(xa), 64, 0)
    for t in range(300):
        idx = stream.indices(t)
        loss = F.cross_entropy(base(xa[idx]), ya[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    base.eval()
    mem = xa[torch.randperm(len(xa), generator=torch.Generator().manual_seed(1))[:100]]
    anchor = Anchor.from_model(base, mem)
    dist = get_distance("bhattacharyya")
    held = xte[a_te]
    with torch.no_grad():
        held0 = base(held)
        ce_b0 = float(F.cross_entropy(base(xb), yb))
    w0 = torch.cat([p.detach().reshape(-1) for p in base.parameters()])
    radii = [float(r) for r in args.radii.split(",") if r]

    class Runner:
        def __init__(self, name: str, step):
            self.name, self.step_fn = name, step
            self.model = copy.deepcopy(base)
            self.stream = BatchStream(len(xb), 64, 2)
            self.t, self.seconds, self.length = 0, 0.0, 0.0
            self.prev = w0.clone()

        def run_for(self, seconds: float) -> None:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds and self.seconds + (time.perf_counter() - t0) < args.budget:
                idx = self.stream.indices(self.t)
                self.step_fn(self, xb[idx], yb[idx])
                self.t += 1
                # Path length from consecutive steps (the weights are on the CPU: cheap).
                w = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
                self.length += float((w - self.prev).norm())
                self.prev = w
            self.seconds += time.perf_counter() - t0

        def result(self) -> dict:
            m = self.model
            with torch.no_grad():
                drift = float(dist(m(held), held0))
                ce_b = float(F.cross_entropy(m(xb), yb))
            straight = float((self.prev - w0).norm())
            return {"method": self.name, "steps": self.t, "seconds": self.seconds,
                    "ms_per_step": 1e3 * self.seconds / max(self.t, 1), "fip_length": self.length,
                    "straight_distance": straight, "heldout_drift": drift,
                    "drift_per_length": drift / max(self.length, 1e-12),
                    "drift_per_straight": drift / max(straight, 1e-12),
                    "ce_B_drop": ce_b0 - ce_b, "acc_A": _acc(m, xte[a_te], yte[a_te]),
                    "acc_B": _acc(m, xte[b_te], yte[b_te])}

    def penalty(r: Runner, x, y) -> None:
        if not hasattr(r, "opt"):
            r.opt = torch.optim.Adam(r.model.parameters(), lr=args.lr)
        penalty_step(r.model, r.opt, anchor, distance=dist, lam=args.lam, beta=args.beta,
                     secondary=lambda logits: F.cross_entropy(logits, y), x_new=x)

    def metric(radius: float):
        def step(r: Runner, x, y) -> None:
            metric_step(r.model, anchor, distance=dist, lam=args.lam, beta=args.beta, radius=radius,
                        iters=args.cg_iters, secondary=lambda logits: F.cross_entropy(logits, y), x_new=x)
        return step

    runners = [Runner(f"penalty(adam lr={args.lr:g})", penalty)]
    runners += [Runner(f"metric(eps={r:g}, cg={args.cg_iters})", metric(r)) for r in radii]
    while any(r.seconds < args.budget - 1e-3 for r in runners):
        for r in runners:
            if r.seconds < args.budget - 1e-3:
                r.run_for(args.slice)
    rows = [r.result() for r in runners]
    out = {"setting": "digits MLP 256-256, task A = classes 0-4 (base), task B = 5-9 (secondary), "
                      "memory 100, Bhattacharyya", "lam": args.lam, "beta": args.beta, "budget_s": args.budget,
           "base_acc_A": _acc(base, xte[a_te], yte[a_te]), "ce_B_at_w0": ce_b0,
           "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "results": rows}
    print(json.dumps(out, indent=2))
    hdr = f"{'method':32s} {'steps':>6s} {'ms/step':>8s} {'length':>8s} {'drift':>9s} {'drift/len':>10s} " \
          f"{'ce_B drop':>9s} {'acc_A':>6s} {'acc_B':>6s}"
    print(hdr)
    for r in rows:
        print(f"{r['method']:32s} {r['steps']:6d} {r['ms_per_step']:8.2f} {r['fip_length']:8.3f} "
              f"{r['heldout_drift']:9.5f} {r['drift_per_length']:10.6f} {r['ce_B_drop']:9.4f} "
              f"{r['acc_A']:6.3f} {r['acc_B']:6.3f}")
    return out


if __name__ == "__main__":
    main()
