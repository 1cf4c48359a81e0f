"""Parity with the reference: every shipped fixture x every distiller it records, through reference_check."""

import json
import os
from pathlib import Path

import pytest

from pat_hf.reference.check import format_table, main, recorded_distillers, run_check

GOLDEN = Path(os.environ.get("PAT_HF_GOLDEN_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))
FIXTURES = sorted(GOLDEN.glob("*.safetensors")) if GOLDEN.is_dir() else []
CASES = [(path, name) for path in FIXTURES for name in recorded_distillers(path)]
needs_golden = pytest.mark.skipif(not FIXTURES, reason=f"reference fixtures not found in {GOLDEN} "
                                                       "(set PAT_HF_GOLDEN_DIR); they ship beside the repo in CI")


@needs_golden
@pytest.mark.parametrize("fixture,distiller", CASES, ids=[f"{p.stem}-{d}" for p, d in CASES])
def test_matches_the_reference(fixture, distiller):
    comparisons = run_check(fixture, distiller)
    assert all(c.ok for c in comparisons), format_table(fixture.stem, distiller, comparisons)


# --torch_compile compiles the whole distiller: its forwards, traced by dynamo and AOTAutograd (aot_eager, without
# inductor's code generation, which takes minutes per pair on a small CPU), must meet the same fixtures. PAT on a
# CNN -> ViT pair in the suite (prompts, feedback from step 1 in step 2, the stage hooks); every case with
# -m benchmark, and benchmarks/compiled_parity.py writes the table.
SUITE_COMPILED_CASE = ("convnext_to_deit", "pat")


@needs_golden
@pytest.mark.parametrize("fixture,distiller", [
    pytest.param(path, name, id=f"{path.stem}-{name}",
                 marks=() if (path.stem, name) == SUITE_COMPILED_CASE else pytest.mark.benchmark)
    for path, name in CASES])
def test_compiled_distiller_matches_the_reference(fixture, distiller):
    import torch._dynamo

    torch._dynamo.reset()
    comparisons = run_check(fixture, distiller, compile_backend="aot_eager")
    assert all(c.ok for c in comparisons), format_table(fixture.stem, distiller, comparisons)


@needs_golden
def test_every_fixture_records_the_core_distillers():
    for path in FIXTURES:
        assert {"vanilla", "kd", "dkd", "dist", "pat"} <= set(recorded_distillers(path)), path


@needs_golden
def test_cli_exit_status(tmp_path, capsys):
    fixture = FIXTURES[0]
    assert main([str(fixture), "--distiller", "kd"]) == 0
    assert "OK: every quantity within tolerance" in capsys.readouterr().out
    # A fixture whose recorded loss is off by 1% must fail, whatever the pair.
    broken = json.loads(fixture.with_suffix(".json").read_text())
    broken["distillers"]["kd"]["step2"]["loss_kd"] *= 1.01
    (tmp_path / fixture.name).symlink_to(fixture)
    (tmp_path / fixture.with_suffix(".json").name).write_text(json.dumps(broken))
    assert main([str(tmp_path / fixture.name), "--distiller", "kd"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


@needs_golden
def test_reference_training_checkpoint_converts(tmp_path):
    """A reference checkpoint/ file (student in state_dict, whole distiller in state_dict_ema) converts into
    a pat-hf distiller state that reproduces the reference's losses."""
    import argparse

    import torch
    from safetensors.torch import load_file

    from pat_hf.reference.check import build_distiller
    from pat_hf.reference.convert import main as convert

    fixture = GOLDEN / "swin_to_resnet.safetensors"
    meta = json.loads(fixture.with_suffix(".json").read_text())
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(fixture)).items()}
    distiller_state = {k: v for k, v in state.items() if k.startswith(("student.", "teacher."))}
    distiller_state.update({k.removeprefix("extra.pat."): v for k, v in state.items() if k.startswith("extra.pat.")})
    checkpoint = tmp_path / "last.pth.tar"
    torch.save({"epoch": 1, "state_dict": {k.removeprefix("student."): v for k, v in state.items()
                                           if k.startswith("student.")},
                "state_dict_ema": distiller_state, "args": argparse.Namespace(distiller="pat")}, checkpoint)
    convert([str(checkpoint), "--distiller", "pat", "--model", "resnet18", "--model-kwargs",
             json.dumps(meta["student"]["kwargs"]), "--num-classes", "100", "--output", str(tmp_path / "out")])
    converted = load_file(str(tmp_path / "out" / "distiller.safetensors"))
    assert not any(k.startswith("teacher.") for k in converted)
    distiller = build_distiller(meta, load_file(str(fixture)), "pat")
    with torch.no_grad():  # forget what build_distiller loaded: the converted file alone must restore it
        for parameter in [*distiller.student.parameters(), *distiller.extra_parameters()]:
            parameter.zero_()
    missing, unexpected = distiller.load_state_dict(converted, strict=False)
    assert not unexpected and not missing
    distiller.train()
    out = distiller(state["input.x1"], state["input.y1"])
    for key, value in meta["distillers"]["pat"]["step1"].items():
        assert float(out[key].detach()) == pytest.approx(value, rel=1e-4), key
    student = load_file(str(tmp_path / "out" / "student.safetensors"))
    assert torch.equal(student["fc.weight"], distiller.student.fc.weight)


@needs_golden
def test_fixtures_of_other_stage_selections_and_hyperparameters(tmp_path):
    """reference_check builds everything from the fixture's JSON: a fixture with prompts on stages 2 and 4 only,
    another loss weight and a third sample in each batch loads and checks like the shipped ones."""
    import torch
    from safetensors.torch import load_file, save_file

    source = GOLDEN / "convnext_to_deit.safetensors"
    meta = json.loads(source.with_suffix(".json").read_text())
    state = load_file(str(source))
    state = {k: v for k, v in state.items() if not k.startswith(("extra.pat.prompt_blocks.0.",
                                                                  "extra.pat.prompt_blocks.2."))}
    for x, y in (("input.x1", "input.y1"), ("input.x2", "input.y2")):
        state[x] = torch.cat([state[x], state[x][:1].flip(-1)])
        state[y] = torch.cat([state[y], state[y][:1]])
    meta["args"].update(pat_afp_stage=[2, 4], pat_mse_loss_weight=0.5)
    meta["batch"] = 3
    meta["distillers"] = {"pat": meta["distillers"]["pat"]}
    fixture = tmp_path / "variant.safetensors"
    save_file(state, str(fixture))
    fixture.with_suffix(".json").write_text(json.dumps(meta))
    measured = {c.name: c.ours for c in run_check(fixture, "pat")}
    assert measured["extra_param_count"] < meta["distillers"]["pat"]["extra_param_count"]
    record = meta["distillers"]["pat"]
    for step in ("step1", "step2"):
        record[step] = {key: measured[f"{step}.{key}"] for key in record[step]}
    for key in ("step2_logits_sum", "step2_logits_abs_sum", "grad_norm_student", "grad_norm_extra",
                "extra_param_count"):
        record[key] = measured[key]
    record["grad_norm_extra_by_module"] = {name.removeprefix("grad_norm_extra."): value
                                           for name, value in measured.items() if name.startswith("grad_norm_extra.")}
    fixture.with_suffix(".json").write_text(json.dumps(meta))
    assert main([str(fixture)]) == 0
