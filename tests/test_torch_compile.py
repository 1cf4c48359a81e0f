"""`--torch_compile`: the distiller that accelerate compiles (the whole `Distiller`, hence the student, the
teacher's forward and the method's modules) trains as it does eagerly, and compiles once.

A tiny pair per distiller family trains four SGD steps eagerly and compiled from the same seed. In the suite the
backend is aot_eager (dynamo and AOTAutograd exactly as inductor receives them, without code generation, which
takes minutes per pair on a small CPU); the `benchmark`-marked tests run inductor itself. Compiled losses may
differ from eager ones by COMPILED_RTOL, the reference fixtures' loss tolerance: inductor fuses and reorders
float32 reductions, which moves the last bits of a loss, and four SGD steps carry such differences on.

Dynamo's counters must not move after the second step: the first step compiles, the second may recompile once
(PAT's feedback goes from none to the previous step's gap), and from then on every step reuses the graphs.
The only graph breaks allowed are the stage layer's hook registration and removal, host-side by nature (a
RemovableHandle cannot be traced); the forward between them is one graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from pat_hf.distillers import DistillArguments, DistillContext, get_distiller_class
from tests.helpers import save_teacher, tiny_run
from tests.tiny_models import INPUT_SIZE, NUM_CLASSES, tiny_batch, tiny_model

ROOT = Path(__file__).resolve().parents[1]

COMPILED_RTOL = 1e-4
STEPS = 4
BATCH_SIZE = 4
TRAIN_LABELS = torch.arange(3 * BATCH_SIZE) % NUM_CLASSES
ALLOWED_GRAPH_BREAKS = ("StageLayer._add_hooks", "_remove_hooks")

# (distiller, hyper-parameters, teacher family, student family): every distiller, PAT in both modes and with a
# Swin teacher, across CNN and token models.
CASES = {
    "vanilla": ("vanilla", {}, "resnet", "vit"),
    "kd": ("kd", {}, "resnet", "vit"),
    "dkd": ("dkd", {}, "vit", "resnet"),
    "dist": ("dist", {}, "convnext", "mixer"),
    "bkd": ("bkd", {}, "resnet", "vit"),
    "correlation": ("correlation", {}, "swin", "resnet"),
    "fitnet": ("fitnet", {}, "convnext", "resnet"),
    "rkd": ("rkd", {}, "vit", "resnet"),
    "crd": ("crd", {}, "resnet", "mixer"),
    "ofa": ("ofa", {}, "resnet", "vit"),
    "pat-reference": ("pat", {"pat_mode": "reference", "pat_raa_dim": 32}, "resnet", "vit"),
    "pat-corrected": ("pat", {"pat_mode": "corrected", "pat_raa_dim": 32}, "convnext", "swin"),
    # A teacher with buffers (Swin's relative position index) that the unprompted, no-grad pass and the prompted
    # pass with gradients both read.
    "pat-swin-teacher": ("pat", {"pat_mode": "reference", "pat_raa_dim": 32}, "swin", "resnet"),
}


def build(config: str):
    name, overrides, teacher, student = CASES[config]
    cls = get_distiller_class(name)
    hparams = cls.Arguments(**overrides) if cls.Arguments else None
    context = DistillContext(input_size=INPUT_SIZE, num_classes=NUM_CLASSES, train_labels=TRAIN_LABELS)
    return cls(tiny_model(student, seed=1), tiny_model(teacher, seed=2), DistillArguments(distiller=name), hparams,
               context)


def train(config: str, backend: str | None) -> tuple[list[dict[str, float]], list[dict[str, int]]]:
    """Per step: the loss components, and (compiled with `backend`) a snapshot of dynamo's counters after it."""
    distiller = build(config).train()
    model = torch.compile(distiller, backend=backend) if backend else distiller
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.05)
    torch.manual_seed(0)  # CRD draws its negatives in the forward
    losses, snapshots = [], []
    for step in range(STEPS):
        images, labels = tiny_batch(BATCH_SIZE, seed=step)
        batch = {"pixel_values": images, "labels": labels}
        if "index" in type(distiller).batch_keys:
            batch["index"] = (torch.arange(BATCH_SIZE) + step * BATCH_SIZE) % len(TRAIN_LABELS)
        outputs = model(**batch)
        outputs["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append({k: float(v.detach()) for k, v in outputs.items() if k.startswith("loss")})
        snapshots.append({f"{group}.{key}": value for group in ("stats", "frames", "graph_break", "recompiles")
                          for key, value in counters[group].items()})
    return losses, snapshots


@pytest.fixture
def fresh_dynamo():
    """Nothing compiled before; inductor draws random numbers as eager does (CRD's negatives)."""
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def check_compiled_training(config: str, backend: str) -> None:
    eager, _ = train(config, None)
    compiled, snapshots = train(config, backend)
    for step, (e, c) in enumerate(zip(eager, compiled)):
        assert e.keys() == c.keys()
        for name in e:
            assert c[name] == pytest.approx(e[name], rel=COMPILED_RTOL, abs=1e-6), (step, name)
    assert snapshots[1] == snapshots[-1], f"dynamo compiled again after step 2: {snapshots[1]} -> {snapshots[-1]}"
    breaks = [reason for reason in counters["graph_break"]]
    assert all(any(allowed in reason for allowed in ALLOWED_GRAPH_BREAKS) for reason in breaks), breaks


# One per family (logit, feature, OFA, PAT) in the suite; the others take minutes between them on a small CPU.
SUITE_CASES = ("kd", "fitnet", "ofa", "pat-swin-teacher")


@pytest.mark.parametrize("config", SUITE_CASES)
def test_traced_training_equals_eager_and_compiles_once(config: str, fresh_dynamo):
    """dynamo and AOTAutograd as inductor gets them (the graphs, their breaks and guards), run without code
    generation, which takes minutes per pair on a small CPU."""
    check_compiled_training(config, "aot_eager")


@pytest.mark.benchmark
@pytest.mark.parametrize("config", [c for c in CASES if c not in SUITE_CASES])
def test_traced_training_of_the_other_distillers(config: str, fresh_dynamo):
    check_compiled_training(config, "aot_eager")


@pytest.mark.benchmark
@pytest.mark.parametrize("config", ["kd", "ofa", "pat-reference"])
def test_inductor_training_equals_eager_and_compiles_once(config: str, fresh_dynamo):
    check_compiled_training(config, "inductor")


def test_few_labels_compile_settles_after_the_labelled_count_varies(fresh_dynamo):
    """--label-fraction: the gt term averages over the labelled rows of each batch, a count that changes from
    step to step. Its selection runs between graphs (a data-dependent shape); dynamo compiles it for a second
    count once, marks the size dynamic, and after that a batch with any other count compiles nothing. A batch with
    no label (its own branch) or one label (a size dynamo specialises) compiles once each. Losses equal eager ones
    throughout."""
    batch_size = 8
    counts = [2, 5, 3, 6, 7, 4, 8]
    settled_after = 2  # the steps of the first two counts compile
    edge_counts = [0, 1]

    def run(backend: str | None) -> tuple[list[float], list[dict[str, int]]]:
        distiller = build("kd").train()
        model = torch.compile(distiller, backend=backend) if backend else distiller
        losses, snapshots = [], []
        for step, count in enumerate(counts + edge_counts + counts + edge_counts):
            images, labels = tiny_batch(batch_size, seed=step)
            labelled = torch.arange(batch_size) < count
            outputs = model(pixel_values=images, labels=labels, labelled=labelled[torch.randperm(batch_size)])
            outputs["loss"].backward()
            losses.append(float(outputs["loss"].detach()))
            snapshots.append(dict(counters["stats"]))
        return losses, snapshots

    torch.manual_seed(0)
    eager, _ = run(None)
    torch.manual_seed(0)
    compiled, snapshots = run("aot_eager")
    assert compiled == pytest.approx(eager, rel=COMPILED_RTOL, abs=1e-6)
    first_pass = len(counts) + len(edge_counts)
    assert snapshots[settled_after - 1] == snapshots[len(counts) - 1], "a new labelled count compiled again"
    assert snapshots[first_pass - 1] == snapshots[-1], "a count seen before compiled again"


def test_the_torch_compile_flag_trains_pat_as_eager_training_does(tmp_path):
    """`pat-hf-train --torch_compile` end to end (each run in its own process: accelerate keeps one compile
    setting per process): the Trainer hands the distiller to accelerate, which compiles it; every logged loss
    equals the eager run's, and the exported student is the plain timm state dict (no torch.compile prefix)."""
    teacher = save_teacher(tmp_path)
    # SGD: its update is linear in the gradient, so the weights differ as little as the gradients do (Adam divides
    # by the gradient's running scale, which turns last-bit differences of near-zero gradients into whole steps).
    flags = ["--distiller", "pat", "--pat-raa-dim", "32", "--pat-raa-num-queries", "16", "--cost-runs", "0",
             "--seed", "0", "--opt", "sgd", "--lr", "0.01"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    histories, students = {}, {}
    for mode, extra in (("eager", []), ("compiled", ["--torch_compile", "true", "--torch_compile_backend",
                                                     "aot_eager"])):
        output = tmp_path / mode
        done = subprocess.run([sys.executable, "-m", "pat_hf.train", *tiny_run(output, teacher, *flags, *extra)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        history = json.loads((output / "trainer_state.json").read_text())["log_history"]
        histories[mode] = [{k: v for k, v in entry.items() if k.startswith("loss")} for entry in history
                           if "loss" in entry]
        students[mode] = load_file(str(output / "student" / "model.safetensors"))
    assert len(histories["compiled"]) == len(histories["eager"]) == 2
    for eager, compiled in zip(histories["eager"], histories["compiled"]):
        assert eager.keys() == compiled.keys() and "loss_pat_mse" in eager
        for name in eager:
            assert compiled[name] == pytest.approx(eager[name], rel=COMPILED_RTOL, abs=1e-6), name
    assert students["compiled"].keys() == students["eager"].keys()
    differences = {k: float((students["compiled"][k].float() - students["eager"][k].float()).abs().max())
                   for k in students["eager"]}
    assert max(differences.values()) <= 1e-5, max(differences.items(), key=lambda item: item[1])
