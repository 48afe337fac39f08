"""FIP step cost vs a plain fine-tune step, and the metric-vector product vs one gradient.

    python benchmarks/bench_step.py                      # digits MLP on CPU (the README numbers)
    python benchmarks/bench_step.py --preset minilm      # pretrained MiniLM-L6 on BBC News token ids, CPU
    python benchmarks/bench_step.py --preset vit-b16     # timm ViT-B/16, 224 px, batch 128, CUDA, bf16
    python benchmarks/bench_step.py --preset bert-base   # BERT-base (random init), L = 128, CUDA, bf16

A preset only sets defaults: any flag given with it wins (e.g. `--preset minilm --batch 16`). The
MiniLM preset is `--model hf_bert --model-kwargs '{"pretrained_dir": "minilm-l6"}' --input-shape 32
--data bbc_news --data-kwargs '{"max_length": 32, "per_class": 8}' --batch 8 --memory 8 --steps 2
--warmup 1 --rounds 6` (about 80 s on one CPU thread). Inputs are random unless `--data` names a
`fipray.data` dataset (its training split, a seeded choice of batch + memory examples); token-id
models get random ids from their vocabulary with `--data random`.

Prints the command and environment first, then, from one run on one machine:
  fip_step / finetune_step           time ratio of one continual FIP step (new batch + replay memory
                                     in one fused forward, Bhattacharyya invariance) to one CE step;
                                     both steps include the Adam update (model in eval mode)
  flop_ratio                         the FLOP ratio of the same two steps (torch FlopCounterMode:
                                     matmuls/convs/attention; the optimizer's elementwise work is not counted)
  (time ratio) / (flop ratio)        overhead beyond the extra arithmetic (goal <= 1.1)
  gv / grad                          one g·v = Jᵀ(Jv) product (`metric_vp`: JVP + VJP, on the new
                                     batch) vs one loss gradient (goal <= 3)
  gv_op / grad                       one product of `metric_operator` (Bhattacharyya Gauss-Newton
                                     metric, pullback built once and reused, as Lanczos/CG use it)
Times are medians over the timed blocks (fine-tune and FIP blocks interleaved, as are g·v and grad);
`best_*` ratios use the fastest block of each instead (the least disturbed on a shared machine).
On CUDA also the peak allocated memory of one call of each (torch.cuda.max_memory_allocated, GiB;
weights and Adam state included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fipray.core.distances import get_distance
from fipray.core.metric import metric_operator, metric_vp
from fipray.core.step import Anchor, penalty_step
from fipray.data import as_tensors, get_data
from fipray.models import HFTextClassifier, create_model

# BertConfig fields of bert-base-uncased (also transformers' defaults; spelled out so they cannot drift).
BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2}

PRESETS: dict[str, dict] = {
    "minilm": {"model": "hf_bert", "model_kwargs": json.dumps({"pretrained_dir": "minilm-l6"}),
               "input_shape": "32", "num_classes": 5, "data": "bbc_news",
               "data_kwargs": json.dumps({"max_length": 32, "per_class": 8}),
               "batch": 8, "memory": 8, "steps": 2, "warmup": 1, "rounds": 6},
    "vit-b16": {"model": "timm:vit_base_patch16_224", "input_shape": "3,224,224", "batch": 128, "memory": 128,
                "device": "cuda", "amp": "bf16", "steps": 20, "threads": 4},
    "bert-base": {"model": "hf_bert", "model_kwargs": json.dumps({"config": BERT_BASE}), "input_shape": "128",
                  "batch": 128, "memory": 128, "device": "cuda", "amp": "bf16", "steps": 20, "threads": 4},
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev, steps: int, repeats: int = 5, warmup: int | None = None) -> list[float]:
    """Seconds per call in each of `repeats` blocks of `steps` calls (after `warmup` calls;
    default max(3, steps // 5))."""
    for _ in range(max(3, steps // 5) if warmup is None else warmup):
        fn()
    _sync(dev)
    blocks = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(dev)
        blocks.append((time.perf_counter() - t0) / steps)
    return blocks


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _peak_gib(fn, dev) -> float | None:
    """Peak allocated CUDA memory (GiB) during one call of fn; None off CUDA."""
    if dev.type != "cuda":
        return None
    _sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    _sync(dev)
    return torch.cuda.max_memory_allocated(dev) / 2**30


def _environment(dev: torch.device, threads: int) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
           "machine": platform.platform(), "cpus": os.cpu_count()}
    for mod in ("transformers", "timm"):
        if mod in sys.modules:
            env[mod] = getattr(sys.modules[mod], "__version__", "?")
    if dev.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
    if hasattr(os, "getloadavg"):
        env["loadavg_1min"] = round(os.getloadavg()[0], 2)
    return env


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="defaults for a named setting (flags still win)")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--model-kwargs", default="{}", help="JSON kwargs for create_model")
    ap.add_argument("--input-shape", default="1,8,8", help="per-example shape; (L,) for token ids")
    ap.add_argument("--num-classes", type=int, default=10, help="ignored with --data (the dataset's count)")
    ap.add_argument("--data", default="random", help="'random' or a fipray.data dataset name (training split)")
    ap.add_argument("--data-kwargs", default="{}", help="JSON kwargs for get_data")
    ap.add_argument("--batch", type=int, default=64, help="new-task batch size")
    ap.add_argument("--memory", type=int, default=80, help="replay memory size (digits: 4 tasks x 20)")
    ap.add_argument("--steps", type=int, default=200, help="steps per timing block")
    ap.add_argument("--warmup", type=int, default=None, help="calls before each timing (default max(3, steps/5))")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved fine-tune/FIP timing rounds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["none", "bf16"], default="none")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", default=None, help="also write the result JSON to this file")
    ap.add_argument("--smoke-test", action="store_true", help="tiny run to check the script works")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = _parser()
    pre, _ = ap.parse_known_args(argv)
    if pre.preset:
        ap.set_defaults(**PRESETS[pre.preset])
    return ap.parse_args(argv)


def _inputs(args, model, shape, dev, bundle) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(x_new, y_new, memory inputs, description of the inputs)."""
    n = args.batch + args.memory
    if bundle is not None:
        if tuple(bundle.input_shape) != shape:
            raise SystemExit(f"--data {args.data} gives inputs of shape {tuple(bundle.input_shape)}, "
                             f"--input-shape is {shape}")
        x, y = as_tensors(bundle.train)
        if len(x) < n:
            raise SystemExit(f"--data {args.data} has {len(x)} training examples, batch + memory needs {n}")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
        how = f"{args.data} {args.data_kwargs}: {n} of its {len(x)} training examples (seeded choice)"
        x, y = x[idx].to(dev), y[idx].to(dev)
        return x[: args.batch], y[: args.batch], x[args.batch :], how
    if isinstance(model, HFTextClassifier):
        vocab = model.model.config.vocab_size
        low = 1000 if vocab > 2000 else 1  # skip [PAD] and BERT's special/[unused] ids
        x = torch.randint(low, vocab, (n, *shape), device=dev)
        how = f"random token ids in [{low}, {vocab})"
    else:
        x = torch.rand(n, *shape, device=dev)
        how = "uniform random inputs in [0, 1)"
    y = torch.randint(0, args.num_classes, (args.batch,), device=dev)
    return x[: args.batch], y, x[args.batch :], how


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke_test:
        args.steps, args.rounds = min(args.steps, 5), min(args.rounds, 2)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    command = shlex.join(["python", "benchmarks/bench_step.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# command: {command}", flush=True)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    model_kwargs = json.loads(args.model_kwargs)
    bundle = None if args.data == "random" else get_data(args.data, **json.loads(args.data_kwargs))
    num_classes = args.num_classes = args.num_classes if bundle is None else bundle.num_classes
    model = create_model(args.model, num_classes=num_classes, input_shape=shape, **model_kwargs).to(dev)
    x_new, y_new, x_mem, inputs_desc = _inputs(args, model, shape, dev, bundle)
    env = _environment(dev, torch.get_num_threads())
    print(f"# environment: {json.dumps(env)}", flush=True)
    print(f"# setting: model {args.model} {model_kwargs}, input shape {shape}, {num_classes} classes, "
          f"batch {args.batch}, memory {args.memory}, amp {args.amp}; inputs: {inputs_desc}; "
          f"timing: {args.rounds} interleaved rounds x 2 blocks x {args.steps} steps of each step, then "
          f"{max(args.rounds - 1, 1)} rounds x 2 blocks x {max(args.steps // 4, 2)} calls of g·v, grad, g·v (operator); "
          f"each pair of blocks after {args.warmup if args.warmup is not None else max(3, args.steps // 5)} "
          "warm-up call(s)",
          flush=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    anchor = Anchor.from_model(model, x_mem)
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
    for _ in range(args.rounds):
        t_ft += _time(finetune, dev, args.steps, repeats=2, warmup=args.warmup)
        t_fip += _time(fip, dev, args.steps, repeats=2, warmup=args.warmup)
    ft, fp = statistics.median(t_ft), statistics.median(t_fip)
    flop_ft, flop_fip = _flops(finetune), _flops(fip)
    mem = {"finetune_step": _peak_gib(finetune, dev), "fip_step": _peak_gib(fip, dev)}

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

    op = metric_operator(f, params, distance=dist)

    def gv_op() -> None:
        op(v)

    gv_steps = max(args.steps // 4, 2)
    blocks: dict[str, list[float]] = {"gv": [], "grad": [], "gv_op": []}
    for _ in range(max(args.rounds - 1, 1)):  # interleaved, like the steps
        blocks["gv"] += _time(gv, dev, gv_steps, repeats=2, warmup=args.warmup)
        blocks["grad"] += _time(grad, dev, gv_steps, repeats=2, warmup=args.warmup)
        blocks["gv_op"] += _time(gv_op, dev, gv_steps, repeats=2, warmup=args.warmup)
    blocks.update(finetune=t_ft, fip=t_fip)
    t_gv, t_grad, t_gv_op = (statistics.median(blocks[k]) for k in ("gv", "grad", "gv_op"))
    best = {k: min(b) for k, b in blocks.items()}
    mem.update(gv=_peak_gib(gv, dev), grad=_peak_gib(grad, dev), gv_op=_peak_gib(gv_op, dev))
    ratio = fp / ft
    flop_ratio = flop_fip / max(flop_ft, 1)
    out = {
        "command": command, "model": args.model, "model_kwargs": model_kwargs, "input_shape": list(shape),
        "inputs": inputs_desc, "num_classes": num_classes, "params": sum(p.numel() for p in model.parameters()),
        "batch": args.batch, "memory": args.memory, "steps": args.steps, "rounds": args.rounds,
        "warmup": args.warmup, "device": str(dev), "device_name": env["device_name"], "amp": args.amp,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "environment": env,
        "finetune_step_ms": ft * 1e3, "fip_step_ms": fp * 1e3,
        "fip_over_finetune": ratio, "flop_ratio": flop_ratio, "time_ratio_over_flop_ratio": ratio / flop_ratio,
        "gv_ms": t_gv * 1e3, "grad_ms": t_grad * 1e3, "gv_over_grad": t_gv / t_grad,
        "gv_op_ms": t_gv_op * 1e3, "gv_op_over_grad": t_gv_op / t_grad,
        # Best (minimum) block of each: the least disturbed by other processes on a shared machine.
        "best_fip_over_finetune": best["fip"] / best["finetune"], "best_gv_over_grad": best["gv"] / best["grad"],
        "best_gv_op_over_grad": best["gv_op"] / best["grad"],
        "blocks_ms": {k: [round(t * 1e3, 3) for t in b] for k, b in blocks.items()},
        "wall_s": time.perf_counter() - t_start,
        "loadavg_1min_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if dev.type == "cuda":
        out["peak_mem_gib"] = mem
    print(json.dumps(out, indent=2))
    print(f"fip_step / finetune_step = {ratio:.3f}; flop ratio = {flop_ratio:.3f}; "
          f"(time ratio)/(flop ratio) = {ratio / flop_ratio:.3f} (goal <= 1.1); "
          f"gv / grad = {t_gv / t_grad:.3f} (goal <= 3); gv_op / grad = {t_gv_op / t_grad:.3f}  "
          f"[medians of the timed blocks; from the best blocks: fip/ft {out['best_fip_over_finetune']:.3f}, "
          f"gv/grad {out['best_gv_over_grad']:.3f}, gv_op/grad {out['best_gv_op_over_grad']:.3f}]")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
