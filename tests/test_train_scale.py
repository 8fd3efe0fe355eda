"""`mmpl train` as it runs at scale: several processes through real launchers (accelerate, torchrun;
gloo on the CPU), a run killed and relaunched, a folder of mp4 + txt clips with and without the
prepared cache, bf16 with checkpointed activations, and the memory estimate against what autograd
actually keeps."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli
from mmpl_cli.errors import InputError

CONFIG = """version: 1
out: {out}
model: new
profile: tiny
seed: 3
{extra}
stages:
  - {{stage: transformer, steps: {steps}, lr: 1e-3, checkpoint_every: 2, pool: 2, batch: 4, text_encoder: {text},
     groups: [initial, plan, populate_stage_one, populate_stage_two, continuation, full, progressive]}}
"""
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]


def config(folder: Path, steps: int = 6, text: bool = True, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.yaml"
    path.write_text(CONFIG.format(out=folder / "run", steps=steps, text=str(text).lower(), extra=extra))
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    model = folder / "run" / "model"
    return {**load_file(model / "transformer/diffusion_pytorch_model.safetensors"),
            **{f"text.{k}": v for k, v in load_file(model / "text_encoder/model.safetensors").items()}}


def losses(folder: Path) -> list[float]:
    return torch.load(folder / "run/stage1-transformer/checkpoint.pt", weights_only=True)["losses"]


def launch(command: list[str], port: int, path: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*command, str(port), "-m", "mmpl_cli", "train", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += parents.get(found[-1], [])
    return found


def quiet(said: list[str]):
    """A progress class for `train.command` that keeps its messages in `said`."""
    class Quiet:
        def __init__(self, quiet: bool = False):
            pass

        report = close = staticmethod(lambda *a: None)
        message = staticmethod(said.append)

    return Quiet


def finish(child: subprocess.Popen) -> str:
    out, _ = child.communicate(timeout=600)
    assert child.returncode == 0, out
    return out


@pytest.mark.slow
def test_two_processes_train_as_one_does_and_resume_after_a_kill(tmp_path):
    """The tiny recipe's transformer stage (text encoder trained along, every group), global batch 4:
    one process, two through `accelerate launch`, and two killed mid-way and relaunched through torchrun."""
    from mmpl_cli.train import command

    one, two, killed = (config(tmp_path / name, steps=12) for name in ("one", "two", "killed"))
    said = []
    assert command(one, quiet(said), None, "cpu", False, None, None).startswith("model folder:")
    assert any("global batch 4 = 4 per process x 1 process(es)" in m for m in said)
    for folder in (two, killed):  # the same clip pool, encoded once (suite time)
        shutil.copytree(tmp_path / "one/run/stage1-transformer/pool", folder.parent / "run/stage1-transformer/pool")
    out = finish(launch(ACCELERATE, 29611, two))
    assert "global batch 4 = 2 per process x 2 process(es) x 1 accumulation step(s)" in out
    assert out.count("model folder:") == 1  # the main process speaks for both
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # the same weights within float rounding (the gradients are averaged in another order)
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    assert np.allclose(losses(tmp_path / "one"), losses(tmp_path / "two"), rtol=1e-5)

    progress = tmp_path / "killed/run/stage1-transformer/progress.json"
    child = launch(ACCELERATE, 29612, killed)
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["step"] >= 2:
            break
        time.sleep(0.02)
    assert child.poll() is None, "training ended before it could be killed"
    for pid in tree(child.pid):  # the launcher and both workers (in sessions of their own), no chance to save
        os.kill(pid, signal.SIGKILL)
    child.communicate()
    stopped = json.loads(progress.read_text())["step"]
    assert 2 <= stopped < 12
    out = finish(launch(TORCHRUN, 29613, killed))
    assert f"resuming from step {stopped} of 12" in out
    c = weights(tmp_path / "killed")
    assert all(torch.equal(b[k], c[k]) for k in b), "the resumed two-process run differs from the uninterrupted one"
    assert losses(tmp_path / "killed") == losses(tmp_path / "two")


def write_clips(folder: Path, count: int = 3) -> None:
    """Procedural clips at another size and frame rate than the tiny profile's (96x64, 16 fps), each
    with its caption, written by the renderer's own ffmpeg."""
    from mmpl_cli import procedural
    from mmpl_cli.video import write_mp4

    folder.mkdir(parents=True)
    for i in range(count):
        scene = procedural.scene_from_seed(100 + i)
        write_mp4(procedural.render_scene(scene, 120, 128, 96), folder / f"clip{i}.mp4", fps=24)
        (folder / f"clip{i}.txt").write_text(scene.caption() + "\n")


@pytest.mark.slow
def test_a_folder_of_clips_trains_the_same_with_and_without_prepare(tmp_path):
    from mmpl_cli.train import command

    write_clips(tmp_path / "clips")
    data = f"data: {{folder: {tmp_path / 'clips'}, cache: {tmp_path / 'prepared'}}}"
    plain, prepared = config(tmp_path / "plain", 3, False, data), config(tmp_path / "prepared-run", 3, False, data)
    said: list[str] = []
    Quiet = quiet(said)

    assert command(plain, Quiet, None, "cpu", False, None, None).startswith("model folder:")
    assert not any("prepared" in m for m in said)
    said.clear()
    assert command(prepared, Quiet, None, "cpu", True, None, None) == f"prepared data: {tmp_path / 'prepared'}"
    assert not (tmp_path / "prepared-run/run/stage1-transformer").exists()  # prepared only
    shards = sorted((tmp_path / "prepared").glob("pool-*.safetensors"))
    assert len(shards) == 1 and "text.empty" in load_file(shards[0])
    command(prepared, Quiet, None, "cpu", False, None, None)
    assert any("latents and captions prepared" in m for m in said)
    assert not (tmp_path / "prepared-run/run/stage1-transformer/pool").exists()  # no VAE ran in the stage
    assert losses(tmp_path / "plain")[:3] == losses(tmp_path / "prepared-run")[:3]

    # resumable shard by shard; a cache made from other data is refused, not trained on
    shards[0].unlink()
    said.clear()
    command(prepared, Quiet, None, "cpu", True, None, None)
    assert any("encoding 1 shard(s)" in m for m in said)
    (tmp_path / "clips/clip9.mp4").write_bytes((tmp_path / "clips/clip0.mp4").read_bytes())  # a clip added
    (tmp_path / "clips/clip9.txt").write_text("a red circle moves left on a blue background\n")
    with pytest.raises(InputError, match="expected a pool made from this config's data and model, found one that "
                                         "differs in videos"):
        command(config(tmp_path / "again", 3, False, data), Quiet, None, "cpu", False, None, None)


@pytest.mark.slow
def test_bf16_with_checkpointed_activations_trains(tmp_path):
    path = config(tmp_path, 2, False, "mixed_precision: bf16\ngradient_checkpointing: true\ndevice: cpu")
    proc = run_cli("train", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "mixed precision bf16, checkpointed activations" in proc.stdout
    assert all(np.isfinite(losses(tmp_path))) and len(losses(tmp_path)) == 2


def test_checkpointed_blocks_give_the_gradients_of_plain_ones(backend):
    """Recomputed in the backward pass, a block must see the frame positions and the block mask of
    its forward pass (a context variable, which the backward pass does not carry)."""
    from mmpl_cli.wan import ContextGroup, checkpoint_blocks

    model = backend.transformer
    torch.manual_seed(0)
    latents = torch.randn(2, 16, 6, 8, 12)
    text = backend.encode_text("a red circle").expand(2, -1, -1)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model.requires_grad_(True)
            evaluate = backend.reference_evaluator((3, 4, 5), (0, 1, 2), [ContextGroup(latents[:, :, :3], (0, 1, 2), ())],
                                                   [text])
            evaluate(latents[:, :, 3:], torch.tensor([300.0, 700.0]), 0).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    try:
        plain = gradients()
        checkpoint_blocks(model)
        assert model.gradient_checkpointing
        checkpointed = gradients()
    finally:
        model.disable_gradient_checkpointing()
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_the_estimate_of_the_paper_setting_and_a_refusal(tmp_path):
    example = REPO / "examples/train-wan14b.yaml"
    proc = run_cli("train", str(example), "--estimate", "32", "--memory-gb", "80")
    assert proc.returncode == 0, proc.stderr
    assert "(32 process(es), sharding full, checkpointing on)" in proc.stdout and ": fits" in proc.stdout
    # 14B unsharded on one 80 GB GPU, one clip: refused before a byte is written or a weight looked for
    path = tmp_path / "train.yaml"
    text = example.read_text().replace("sharding: full", "sharding: none").replace("batch: 32", "batch: 1")
    text = re.sub(r"data:\n(  .*\n)+", "data: procedural\n", text).replace("../runs/wan14b", str(tmp_path / "run"))
    path.write_text(text + "memory_gb: 80\n")
    proc = run_cli("train", str(path), "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "expected training to fit 80 GB per process, found: stages[0] needs" in proc.stderr
    assert "DOES NOT FIT" in proc.stdout and not (tmp_path / "run").exists()


def test_the_activation_figures_are_what_autograd_keeps():
    """ACT_BYTES against a measurement: the bytes of every tensor autograd saves for backward in one
    more Wan block at the 1.3B width (parameters aside), with and without bf16 autocast and
    checkpointing."""
    from diffusers import WanTransformer3DModel

    from mmpl_cli.memory import WAN_TRANSFORMERS, Architecture
    from mmpl_cli.train_memory import ACT_BYTES
    from mmpl_cli.wan import _active, _Session, checkpoint_blocks, install_engine_modules

    arch = Architecture.named("wan2.1-1.3b")
    d, f, latents, h, w, text = arch.dim, arch.transformer["ffn_dim"], 3, 8, 12, 64
    tokens = latents * (h // 2) * (w // 2)

    def saved(layers: int, precision: str, checkpointing: bool) -> int:
        torch.manual_seed(0)
        model = install_engine_modules(WanTransformer3DModel(**{**WAN_TRANSFORMERS["wan2.1-1.3b"], "num_layers": layers}))
        if checkpointing:
            checkpoint_blocks(model)
        own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        shapes = {tuple(p.shape) for p in model.parameters()}
        found: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            copy = tuple(t.shape) in shapes and t.dtype == torch.bfloat16  # autocast's weight copies: counted apart
            if storage.data_ptr() not in own and not copy:
                found[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _active(_Session(torch.arange(latents))), \
                torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            model(hidden_states=torch.randn(1, 16, latents, h, w), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, text, 4096), return_dict=False)
        return sum(found.values())

    for precision in ("no", "bf16"):
        per_d, per_f, per_text = ACT_BYTES[precision]
        block = saved(2, precision, False) - saved(1, precision, False)
        assert abs(block / (tokens * (per_d * d + per_f * f) + text * per_text * d) - 1) < 0.01, (precision, block)
        kept = saved(2, precision, True) - saved(1, precision, True)
        assert kept == tokens * d * (4 if precision == "no" else 2), (precision, kept)


@pytest.mark.parametrize("arch", ["wan2.1-1.3b", "wan2.1-14b"])
def test_the_estimate_counts_the_parameters_the_recipe_trains(arch):
    """train_memory counts Table 3's subsets from the configuration; the recipe picks them by name:
    the two agree on diffusers' own model of each released architecture (on the meta device: no memory)."""
    from diffusers import WanTransformer3DModel

    from mmpl_cli.memory import WAN_TRANSFORMERS, Architecture
    from mmpl_cli.recipe import trainable_names
    from mmpl_cli.train_memory import trainable_params

    with torch.device("meta"):
        named = dict(WanTransformer3DModel(**WAN_TRANSFORMERS[arch]).named_parameters())
    for subset in ("all", "self_attention", "qk"):
        picked = sum(named[name].numel() for name in trainable_names(list(named), subset))
        assert trainable_params(Architecture.named(arch), subset) == picked, subset
