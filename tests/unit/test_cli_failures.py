"""Every command answers a bad file or a bad combination with one `fipray: error:` line and exit 2 (no traceback
unless --debug / FIPRAY_DEBUG=1), and Ctrl-C with one line and exit 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fipray.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["train.steps=2", "path.steps=2", "seeds=[0]"]


def _damaged(tmp_path: Path) -> dict[str, Path]:
    """An empty file, a text file, a truncated torch file and a truncated safetensors file."""
    from safetensors.torch import save_file

    files = {"empty": tmp_path / "empty.pt", "text": tmp_path / "text.pt", "truncated": tmp_path / "trunc.pt",
             "truncated_st": tmp_path / "trunc.safetensors"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("not weights\n")
    torch.save({"w": torch.ones(1000)}, tmp_path / "good.pt")
    files["truncated"].write_bytes((tmp_path / "good.pt").read_bytes()[:300])
    save_file({"w": torch.ones(1000)}, str(tmp_path / "good.safetensors"))
    files["truncated_st"].write_bytes((tmp_path / "good.safetensors").read_bytes()[:200])
    return files


@pytest.mark.parametrize("kind, reason", [("empty", "is empty"), ("text", "not a torch file of tensors"),
                                          ("truncated", "truncated or not a torch file"),
                                          ("truncated_st", "not a readable safetensors file")])
def test_a_damaged_weights_file_is_one_line_naming_it(capsys, tmp_path, kind, reason):
    f = _damaged(tmp_path)[kind]
    rc = main(["continual", "--no-progress", "--out", str(tmp_path / "o"), f"continual.base_weights={f}", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(f) in err and reason in err and "weights_only=False" not in err


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    f = _damaged(tmp_path)["text"]
    with pytest.raises(Exception, match="not a torch file"):
        main(["continual", "--debug", "--no-progress", "--out", str(tmp_path / "o"), f"continual.base_weights={f}", *TINY])
    monkeypatch.setenv("FIPRAY_DEBUG", "1")
    with pytest.raises(Exception, match="not a torch file"):
        main(["continual", "--no-progress", "--out", str(tmp_path / "o"), f"continual.base_weights={f}", *TINY])


BAD = [  # (argv after the command's name, what the one line names): a bad file or a bad combination per command
    (["continual", "--config", "{bad_yaml}"], "bad.yaml"),
    (["sparsify", "--config", str(ROOT / "jobs/configs/continual_digits.yaml")], "is 'continual'"),
    (["ensemble", "ensemble.members=0"], "ensemble.members"),
    (["robust", "--no-progress", "--out", "{empty_dir}/r", "robust.base_weights={text}", "robust.start=adversarial",
      "ensemble.baselines=[pgd_at]", "path.memory_batch_size=32", "ensemble.members=1", "ensemble.sample_every=1",
      *TINY], "not a torch file"),
    (["compose", "--config", "{bad_yaml}"], "bad.yaml"),
    (["spectrum", "spectrum.nothing=1"], "spectrum.nothing"),
    (["paths", "--config", "{bad_yaml}"], "bad.yaml"),
    (["sweep", "--config", "{bad_yaml}"], "bad.yaml"),
    (["query", "--set", "{empty_dir}", "--data", "digits"], "not a network set"),
    (["serve", "--ensemble", "{empty_dir}/nowhere"], "not found"),
    (["attack", "--ensemble", "{empty_dir}"], "ensemble.json"),
    (["data", "fetch", "nothing"], "'nothing'"),
]


@pytest.mark.parametrize("argv, names", BAD, ids=[b[0][0] for b in BAD])
def test_every_command_answers_bad_input_in_one_line(capsys, tmp_path, argv, names):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("path: {lam: [1\n")
    (tmp_path / "empty").mkdir()
    subs = {"bad_yaml": str(bad_yaml), "empty_dir": str(tmp_path / "empty"),
            "text": str(_damaged(tmp_path)["text"])}
    rc = main([a.format(**subs) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "fipray: error:" in err and names in err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """SIGINT during training: one line naming the output folder and how to resume, exit 130, no traceback."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "fipray.cli", "continual", "--no-progress", "--out", str(out),
                          "threads=1", "train.steps=200000", "seeds=[0]", "path.checkpoint_every=50"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.glob("paths/*/base/seed0/checkpoint.pt")):
        time.sleep(0.2)  # the base network's first checkpoint (path.checkpoint_every=50): inside its training
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"interrupted (output folder {out}), path " in err and "run the same command again to resume" in err
    assert "/base/seed0 at step " in err and " of 200000" in err  # where it stopped: the base network's training


def test_an_out_folder_of_another_run_is_refused_unless_forced(capsys, tmp_path):
    out = tmp_path / "o"
    small = ["continual.baselines=[]", "continual.num_tasks=2", "model.kwargs={hidden: [16]}"]
    assert main(["continual", "--no-progress", "--out", str(out), *TINY, *small]) == 0
    capsys.readouterr()
    assert main(["sparsify", "--no-progress", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "holds a continual run" in err and "not this sparsify config" in err and "--force" in err
    assert main(["continual", "--no-progress", "--out", str(out), *TINY, *small, "path.lam=3"]) == 2  # another
    assert "holds a continual run" in capsys.readouterr().err
    assert main(["continual", "--no-progress", "--out", str(out), *TINY, *small]) == 0  # the same config: resumes
    assert main(["sparsify", "--no-progress", "--force", "--out", str(out), *TINY]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("o.replaced-")]
    assert len(aside) == 1 and (aside[0] / "config.yaml").is_file()  # nothing lost
    assert "operation: sparsify" in (out / "config.yaml").read_text()
    assert not list(out.glob("accuracy_matrix*"))  # no continual table left beside the sparsify run
