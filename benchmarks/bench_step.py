"""FIP step cost vs a plain fine-tune step, and the metric-vector product vs one gradient.

    python benchmarks/bench_step.py                      # digits MLP on CPU (the README numbers)
    python benchmarks/bench_step.py --model timm:vit_base_patch16_224 --input-shape 3,224,224 \
        --batch 128 --memory 128 --device cuda --amp bf16 --steps 20   # the GPU check

Prints, from one run on one machine:
  fip_step / finetune_step           time ratio of one continual FIP step (new batch + replay memory
                                     in one fused forward, Bhattacharyya invariance) to one CE step
  flop_ratio                         the FLOP ratio of the same two steps (torch FlopCounterMode)
  (time ratio) / (flop ratio)        overhead beyond the extra arithmetic (goal <= 1.1)
  gv / grad                          one g·v = Jᵀ(Jv) product vs one loss gradient (goal <= 3)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fipray.core.distances import get_distance
from fipray.core.metric import metric_vp
from fipray.core.step import Anchor, penalty_step
from fipray.models import create_model


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev, steps: int, repeats: int = 5) -> float:
    """Median seconds per call over `repeats` blocks of `steps` calls (after a warm-up block)."""
    for _ in range(max(3, steps // 5)):
        fn()
    _sync(dev)
    blocks = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(dev)
        blocks.append((time.perf_counter() - t0) / steps)
    return statistics.median(blocks)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--model-kwargs", default="{}", help="JSON kwargs for create_model")
    ap.add_argument("--input-shape", default="1,8,8")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64, help="new-task batch size")
    ap.add_argument("--memory", type=int, default=80, help="replay memory size (digits: 4 tasks x 20)")
    ap.add_argument("--steps", type=int, default=200, help="steps per timing block")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["none", "bf16"], default="none")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke-test", action="store_true", help="tiny run to check the script works")
    args = ap.parse_args(argv)
    if args.smoke_test:
        args.steps = 5
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.num_classes, input_shape=shape,
                         **json.loads(args.model_kwargs)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x_new = torch.rand(args.batch, *shape, device=dev)
    y_new = torch.randint(0, args.num_classes, (args.batch,), device=dev)
    anchor = Anchor.from_model(model, torch.rand(args.memory, *shape, device=dev))
    dist = get_distance("bhattacharyya")
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.amp == "bf16"
           else torch.autocast(dev.type, enabled=False))

    def finetune() -> None:
        with amp:
            loss = F.cross_entropy(model(x_new), y_new)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def fip() -> None:
        with amp:
            penalty_step(model, opt, anchor, distance=dist, lam=1.0, beta=1.0,
                         secondary=lambda logits: F.cross_entropy(logits, y_new), x_new=x_new)

    model.train(False)
    # Interleave the two measurements so drift in machine load hits both alike.
    t_ft, t_fip = [], []
    for _ in range(3):
        t_ft.append(_time(finetune, dev, args.steps, repeats=2))
        t_fip.append(_time(fip, dev, args.steps, repeats=2))
    ft, fp = statistics.median(t_ft), statistics.median(t_fip)
    flop_ft, flop_fip = _flops(finetune), _flops(fip)

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    xb = x_new

    def f(p):
        with amp:
            return torch.func.functional_call(model, (p, buffers), (xb,)).float()

    v = {k: torch.randn_like(t) for k, t in params.items()}

    def gv() -> None:
        metric_vp(f, params, v)

    def grad() -> None:
        torch.func.grad(lambda p: F.cross_entropy(f(p), y_new))(params)

    t_gv = _time(gv, dev, max(args.steps // 4, 2), repeats=3)
    t_grad = _time(grad, dev, max(args.steps // 4, 2), repeats=3)
    ratio = fp / ft
    flop_ratio = flop_fip / max(flop_ft, 1)
    out = {
        "model": args.model, "params": sum(p.numel() for p in model.parameters()),
        "batch": args.batch, "memory": args.memory, "device": str(dev),
        "device_name": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "amp": args.amp, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "finetune_step_ms": ft * 1e3, "fip_step_ms": fp * 1e3,
        "fip_over_finetune": ratio, "flop_ratio": flop_ratio, "time_ratio_over_flop_ratio": ratio / flop_ratio,
        "gv_ms": t_gv * 1e3, "grad_ms": t_grad * 1e3, "gv_over_grad": t_gv / t_grad,
    }
    print(json.dumps(out, indent=2))
    print(f"fip_step / finetune_step = {ratio:.3f}; flop ratio = {flop_ratio:.3f}; "
          f"(time ratio)/(flop ratio) = {ratio / flop_ratio:.3f} (goal <= 1.1); "
          f"gv / grad = {t_gv / t_grad:.3f} (goal <= 3)")
    return out


if __name__ == "__main__":
    main()
