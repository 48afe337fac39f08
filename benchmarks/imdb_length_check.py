"""How well MiniLM-L6 learns IMDb sentiment at a given input length, learning rate and step count, measured on
held-out TRAINING reviews (``imdb`` ``validation=400``: the test split is not read). Used to size the IMDb task
of jobs/configs/continual_bbc_imdb_minilm.yaml (numbers in benchmarks/results/continual_bbc_imdb_minilm.md).

    python benchmarks/imdb_length_check.py L LR STEPS     # e.g. 64 1e-4 80; prints the accuracy every 20 steps

Pretrained MiniLM-L6 with a fresh 2-class head, 200 training reviews per class, batch 16, Adam, one thread.
"""

import sys
import time

import torch

from fipray.data import get_data
from fipray.models.hf import hf_bert


def main(length: int, lr: float, steps: int) -> None:
    torch.set_num_threads(1)
    b = get_data("imdb", seed=0, per_class=200, max_length=length, validation=400)
    x, y = b.train.tensors
    xv, yv = b.test.tensors
    torch.manual_seed(0)
    m = hf_bert(2, (length,), pretrained_dir="minilm-l6")
    opt = torch.optim.Adam(m.parameters(), lr)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()

    def accuracy() -> float:
        m.eval()
        with torch.no_grad():
            hits = sum((m(xv[i:i + 100]).argmax(1) == yv[i:i + 100]).sum().item() for i in range(0, len(yv), 100))
        m.train()
        return hits / len(yv)

    perm, p = torch.randperm(len(y), generator=g), 0
    for s in range(1, steps + 1):
        if p + 16 > len(y):
            perm, p = torch.randperm(len(y), generator=g), 0
        idx = perm[p:p + 16]
        p += 16
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
        opt.step()
        if s % 20 == 0:
            print(f"L={length} lr={lr} step {s}: val acc {accuracy():.3f}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
