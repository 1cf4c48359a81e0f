"""ONNX and int8 exports of exported student folders: a CNN, a ViT, a Swin and an MLP student, each file checked
against PyTorch when written; the dynamic batch axis; the one-line error for an operator without translation;
pat-hf-export's exit codes and messages."""

import json
import sys

import onnx
import onnxruntime
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn

from pat_hf.cli import export as export_cli
from pat_hf.export.card import ModelCardInfo
from pat_hf.export.onnx import (
    CHECK_FILE,
    FP32_TOLERANCE,
    INT8_FILE,
    ONNX_FILE,
    OnnxCheckError,
    OnnxExportError,
    UnsupportedOperatorError,
    card_section,
    export_model,
    export_student_onnx,
    load_student_folder,
    read_preprocessing,
)
from pat_hf.export.student import export_student
from pat_hf.models.safetensors_state import safetensors_ready
from tests.tiny_models import IMAGE_SIZE, TINY_MODELS, tiny_model

DATA_CONFIG = {"input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
               "std": (0.25, 0.25, 0.25), "crop_pct": 1.0}
FAMILIES = ("resnet", "vit", "swin", "mixer")  # a CNN, a ViT, a Swin and an MLP


def _digits(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images preprocessed as DATA_CONFIG says (grey to RGB, 32x32, normalised) and their labels."""
    digits = load_digits()
    images = torch.tensor(digits.images[start:start + count], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    images = F.interpolate(images / 16, size=IMAGE_SIZE, mode="bilinear")
    return (images - 0.5) / 0.25, torch.tensor(digits.target[start:start + count])


def _student_folder(directory, family: str):
    """A random-init tiny student exported as pat-hf exports one (config.json, model.safetensors, card)."""
    model = tiny_model(family)
    classifier = model.get_classifier()
    # Mixer's classifier starts at zero: every logit would be 0 and the checks compare nothing.
    nn.init.normal_(classifier.weight, std=0.5)
    name, kwargs = TINY_MODELS[family]
    card = ModelCardInfo(student=name, teacher="", teacher_weights="", distiller="kd", dataset="digits")
    return export_student(model, directory / "student", model_kwargs=dict(kwargs), data_config=DATA_CONFIG,
                          class_names=[str(i) for i in range(10)], card=card)


def _batches():
    images, labels = _digits(0, 96)
    return [(images[:48], labels[:48]), (images[48:], labels[48:])]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    folder = _student_folder(tmp_path_factory.mktemp(request.param), request.param)
    result = export_student_onnx(folder, _batches(), int8=True, calibration=_digits(1000, 64)[0])
    return folder, result


def _run(path, images: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"pixel_values": images.numpy()})[0])


def test_fp32_export_matches_pytorch(exported):
    folder, result = exported
    assert result.fp32.passed and result.fp32.images == 96 and result.fp32.logit_range > 0
    assert result.fp32.max_abs_diff <= FP32_TOLERANCE * result.fp32.logit_range
    assert result.fp32.top1_agreement == 1.0 and result.fp32.top1 == pytest.approx(result.torch_top1)
    assert result.fp32.batch_sizes == [1, 48]


def test_batch_axis_is_dynamic(exported):
    folder, _ = exported
    model = load_student_folder(folder)
    images = _digits(200, 3)[0]
    with torch.no_grad():
        expected = model(images)
    for batch in (images[:1], images):
        logits = _run(folder / ONNX_FILE, batch)
        assert logits.shape == (len(batch), 10)
        torch.testing.assert_close(logits, expected[:len(batch)], rtol=0, atol=1e-4 * float(expected.abs().max()))
    assert _run(folder / INT8_FILE, images).shape == (3, 10)


def test_int8_file_is_written_with_its_agreement_and_accuracy(exported):
    folder, result = exported
    assert (folder / INT8_FILE).stat().st_size == result.int8.size_bytes
    assert result.int8.size_bytes < result.fp32.size_bytes
    assert result.int8.passed and 0.9 <= result.int8.top1_agreement <= 1
    assert 0 <= result.int8.top1 <= 100
    assert result.int8_top1_change == pytest.approx(result.int8.top1 - result.torch_top1)
    assert result.quantization["method"] == "static" and result.quantization["calibration_images"] == 64


def test_check_is_recorded_and_preprocessing_stays_in_the_config(exported):
    folder, result = exported
    assert json.loads((folder / CHECK_FILE).read_text()) == json.loads(json.dumps(result.to_dict()))
    preprocessing = read_preprocessing(folder)
    assert preprocessing["mean"] == [0.5, 0.5, 0.5] and preprocessing["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    metadata = {p.key: p.value for p in onnx.load(str(folder / ONNX_FILE)).metadata_props}
    assert json.loads(metadata["preprocessing"]) == preprocessing
    assert json.loads(metadata["label_names"]) == [str(i) for i in range(10)]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith((".", "model"))) == \
        [ONNX_FILE, "model.safetensors", INT8_FILE]


def test_card_section_lists_the_files_and_its_snippet_runs(exported, monkeypatch):
    folder, result = exported
    section = card_section(result)
    assert f"| `{ONNX_FILE}` | fp32 | {result.fp32.size_bytes / 1e6:.2f} |" in section
    assert f"| `{INT8_FILE}` | int8 |" in section and "static quantisation" in section
    snippet = section.split("```python\n")[1].split("```")[0]
    images = _digits(300, 1)[0]
    Image.fromarray((images[0] * 0.25 + 0.5).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()).save(
        folder / "image.png")
    monkeypatch.chdir(folder)
    namespace = {}
    exec(snippet, namespace)
    model = load_student_folder(folder)
    with torch.no_grad():
        expected = model(namespace["transform"](Image.open("image.png").convert("RGB")).unsqueeze(0))
    torch.testing.assert_close(torch.from_numpy(namespace["logits"]), expected, rtol=0,
                               atol=1e-4 * float(expected.abs().max()))
    (folder / "image.png").unlink()


def test_dynamic_int8_needs_no_calibration(tmp_path):
    folder = _student_folder(tmp_path, "mixer")
    result = export_student_onnx(folder, _batches()[:1], int8=True, int8_method="dynamic")
    assert result.quantization["method"] == "dynamic" and result.int8.passed
    assert (folder / INT8_FILE).is_file()


def test_static_int8_without_calibration_is_refused(tmp_path):
    folder = _student_folder(tmp_path, "resnet")
    with pytest.raises(OnnxExportError, match="needs calibration images"):
        export_student_onnx(folder, _batches(), int8=True)
    assert not (folder / ONNX_FILE).exists()


def test_a_failed_check_writes_no_file_and_says_why(tmp_path):
    folder = _student_folder(tmp_path, "resnet")
    (folder / INT8_FILE).write_bytes(b"an int8 export of earlier weights")
    with pytest.raises(OnnxCheckError, match=r"^model_int8.onnx failed its check .*; not written$") as caught:
        export_student_onnx(folder, _batches(), int8=True, calibration=_digits(1000, 32)[0],
                            min_int8_agreement=1.01)
    assert caught.value.result.fp32.passed and not caught.value.result.int8.passed
    assert (folder / ONNX_FILE).is_file() and not (folder / INT8_FILE).exists()
    assert json.loads((folder / CHECK_FILE).read_text())["passed"] is False


def test_a_folder_without_preprocessing_is_refused(tmp_path):
    folder = _student_folder(tmp_path, "resnet")
    config = json.loads((folder / "config.json").read_text())
    del config["pretrained_cfg"]["mean"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(OnnxExportError, match=r"lacks the preprocessing \(mean in pretrained_cfg\)"):
        export_student_onnx(folder, _batches())


@torch.library.custom_op("pat_hf_test::scramble", mutates_args=())
def _scramble(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


@_scramble.register_fake
def _(x):
    return torch.empty_like(x)


class _Scrambler(nn.Module):
    """A model with an operator that no ONNX translation exists for."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(IMAGE_SIZE, 10)

    def forward(self, x):
        return _scramble(self.linear(x)).mean((1, 2))


def test_an_operator_without_translation_fails_in_one_line_naming_it(tmp_path):
    with pytest.raises(UnsupportedOperatorError) as caught:
        export_model(_Scrambler(), tmp_path / ONNX_FILE, (3, IMAGE_SIZE, IMAGE_SIZE), name="scrambler")
    assert caught.value.operator == "pat_hf_test.scramble.default"
    assert str(caught.value) == ("scrambler cannot be exported to ONNX: the exporter has no translation of the "
                                 "operator pat_hf_test.scramble.default (opset 18); try another --opset, or a "
                                 "student without that operator")
    assert not (tmp_path / ONNX_FILE).exists()


def _cli(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["pat-hf-export", *argv])
    with pytest.raises(SystemExit) as caught:
        export_cli.cli()
        raise SystemExit(0)
    return caught.value.code


def test_cli_exports_with_the_runs_data(tmp_path, monkeypatch, capsys):
    """The checks run on the run's evaluation subset (args.yaml beside the student), digits read offline."""
    folder = _student_folder(tmp_path / "run", "resnet")
    (folder.parent / "args.yaml").write_text(yaml.safe_dump({"data": {"dataset": "digits", "max_eval_samples": 40},
                                                             "training": {"seed": 3}}))
    assert _cli(monkeypatch, str(folder), "--format", "onnx", "--int8", "--batch-size", "16",
                "--calibration-samples", "32") == 0
    out = capsys.readouterr().out
    assert out.startswith("model.onnx (") and "\nmodel_int8.onnx (" in out and "passed on 40 images" in out
    check = json.loads((folder / CHECK_FILE).read_text())
    assert check["fp32"]["images"] == 40 and check["fp32"]["batch_sizes"] == [1, 8, 16]
    assert check["quantization"]["calibration_images"] == 32 and check["passed"]
    assert _cli(monkeypatch, str(folder), "--eval-batches", "1") == 0
    assert json.loads((folder / CHECK_FILE).read_text())["fp32"]["images"] == 32
    assert not (folder / INT8_FILE).exists()  # an fp32-only export removes the int8 file of earlier weights


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["{folder}", "--opset", "x"], 2, "pat-hf-export: argument --opset: invalid int value: 'x' (see pat-hf-export "
                                      "--help)\n"),
    (["{folder}", "--format", "tflite"], 2, "pat-hf-export: argument --format: invalid choice: 'tflite' (choose "
                                            "from 'onnx') (see pat-hf-export --help)\n"),
    (["{folder}", "--eval-batches", "0"], 2, "pat-hf-export: --eval-batches must be at least 1, got 0 (see "
                                             "pat-hf-export --help)\n"),
    (["{folder}/missing"], 2, "pat-hf-export: not a folder: {folder}/missing (see pat-hf-export --help)\n"),
    (["{tmp}"], 1, "pat-hf-export: {tmp} is not an exported student folder (config.json and model.safetensors); "
                   "pass the run's student/ folder\n"),
    (["{folder}", "--dataset", "no/such-dataset"], 1, None),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, code, message):
    folder = _student_folder(tmp_path, "resnet")
    values = {"folder": folder, "tmp": tmp_path}
    assert _cli(monkeypatch, *(a.format(**values) for a in argv)) == code
    err = capsys.readouterr().err
    if message is None:
        assert err.startswith("pat-hf-export: ") and err.count("\n") == 1 and "Traceback" not in err
    else:
        assert err == message.format(**values)
    assert not (folder / ONNX_FILE).exists()


def test_cli_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    assert _cli(monkeypatch, str(tmp_path), "--debug") == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("pass the run's student/ folder\n")


def test_a_student_holding_one_module_under_two_names_exports_and_loads_back(tmp_path):
    # CoaT reuses each convolutional position encoding under two names: timm's save_for_hf fails on it
    # ("Some tensors share memory"), so a CoaT student's export failed at the end of its training.
    model = timm.create_model("coat_tiny", num_classes=10, img_size=IMAGE_SIZE).eval()
    assert model.serial_blocks1[0].cpe is model.cpe1
    card = ModelCardInfo(student="coat_tiny", teacher="", teacher_weights="", distiller="kd", dataset="digits")
    folder = export_student(model, tmp_path / "student", model_kwargs={"img_size": IMAGE_SIZE},
                            data_config=DATA_CONFIG, class_names=None, card=card)
    loaded = load_student_folder(folder)
    images = _digits(0, 4)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    assert loaded.serial_blocks1[0].cpe is loaded.cpe1


def test_safetensors_ready_copies_shared_and_non_contiguous_tensors_only():
    weight = torch.randn(4, 4)
    state = {"a": weight, "b": weight, "view": weight[:, :2], "t": torch.randn(3, 5).t(), "own": torch.randn(2)}
    ready = safetensors_ready(state)
    assert ready["a"] is weight and ready["own"] is state["own"]
    for name in ("b", "view", "t"):
        assert ready[name].is_contiguous() and ready[name].data_ptr() != weight.data_ptr()
        torch.testing.assert_close(ready[name], state[name])
    save_file(ready, "/dev/null")  # what safetensors refuses, given `state` itself
    with pytest.raises(RuntimeError, match="share memory"):
        save_file({"a": weight, "b": weight}, "/dev/null")


def _gives_up(finish):
    return lambda self, *args, **kwargs: finish(self, *args, **kwargs) and False


def _crashes(finish):
    def infer(self, *args, **kwargs):
        raise TypeError("object of type 'NoneType' has no len()")  # as it crashes on EdgeNeXt's Expand
    return infer


@pytest.mark.parametrize("failure", [_gives_up, _crashes])
def test_int8_goes_on_when_onnx_runtimes_symbolic_shape_inference_fails(tmp_path, monkeypatch, failure):
    # ONNX Runtime's symbolic shape inference gives up on some graphs (it then saved sym_shape_infer_temp.onnx
    # and its weights into the working directory) or crashes (EdgeNeXt, XCiT, Swin V2): the int8 export failed.
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    monkeypatch.setattr(SymbolicShapeInference, "_infer_impl", failure(SymbolicShapeInference._infer_impl))
    working_directory = tmp_path / "cwd"
    working_directory.mkdir()
    monkeypatch.chdir(working_directory)
    folder = _student_folder(tmp_path, "resnet")
    result = export_student_onnx(folder, _batches()[:1], int8=True, int8_method="dynamic")
    assert result.int8.passed and (folder / INT8_FILE).is_file()
    assert result.quantization["shape_inference"].startswith("ONNX's")
    assert list(working_directory.iterdir()) == []


class _BlockedAttention(nn.Module):
    """Attention over 5-D (batch, blocks, heads, tokens, dim) tensors, as Nest computes it, behind timm's
    fused_attn switch: the exporter has no translation of scaled_dot_product_attention for 5-D inputs."""

    def __init__(self):
        super().__init__()
        self.fused_attn = True
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = images.mean(1).reshape(images.shape[0], 4, 2, -1, 8)  # (B, blocks, heads, tokens, dim)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        if self.fused_attn:
            attended = F.scaled_dot_product_attention(q, k, v)
        else:
            attended = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v
        return self.head(attended.mean((1, 2, 3)))


def test_attention_the_exporter_cannot_translate_is_exported_unfused(tmp_path):
    model = _BlockedAttention().eval()
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    export_model(model, tmp_path / "model.onnx", (3, IMAGE_SIZE, IMAGE_SIZE))
    assert model.fused_attn is True  # switched back after the export
    with torch.no_grad():
        torch.testing.assert_close(_run(tmp_path / "model.onnx", images), model(images), rtol=1e-5, atol=1e-6)
