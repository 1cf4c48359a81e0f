"""ONNX and int8 ONNX exports of an exported student folder, each checked against PyTorch when it is written.

    result = export_student_onnx("run/student", batches, int8=True, calibration=images)

writes `model.onnx` (and `model_int8.onnx`) into the folder itself, so that an upload of the folder carries them,
and `onnx_check.json` beside them: what each check measured and whether it passed. A file whose check fails is
not written; an fp32-only export removes an earlier int8 file, which its onnx_check.json would not describe.

The graph is one input `pixel_values` (batch, C, H, W), float32 and already preprocessed, and one output `logits`
(batch, classes); the batch axis is dynamic. Preprocessing stays where timm and transformers read it: the
folder's config.json (`pretrained_cfg`: input_size, interpolation, mean, std, crop_pct). It is checked to be
there and copied into the ONNX model's metadata (`preprocessing`, and `label_names` when the config has them).

Exporter: torch's `torch.onnx.export(dynamo=True)`, which captures the model with `torch.export` and translates
its ATen operators with onnxscript. It is torch's default and maintained exporter (the TorchScript one is
deprecated), it takes a symbolic batch dimension directly, and it names an untranslatable operator precisely
(`aten.cummax.default`), which the one-line error below passes on.

int8: ONNX Runtime's static quantisation in the QDQ format (`quantize_static`), calibrated with min/max ranges on
a subset of the run's training images, per-channel int8 weights and uint8 activations, on the operators that
hold the weights (Conv, MatMul, Gemm). Dynamic quantisation (`int8_method="dynamic"`) needs no calibration but
computes activation ranges at run time and turns convolutions into ConvInteger, which ONNX Runtime runs slower
than float on most CPUs: it only pays for matmul-heavy models (ViTs, MLPs), while QDQ speeds up convolutions too.

Checks, on batches of the evaluation data, with ONNX Runtime on the CPU at the data's batch size and at batch 1
(the dynamic axis): fp32 passes when max |ORT logits - PyTorch logits| <= 1e-4 × the range of PyTorch's logits;
int8, which cannot be that close, passes when its top-1 agrees with PyTorch's on at least `min_int8_agreement` of
the images. With labels, each model's top-1 accuracy is reported too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime
import timm
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from safetensors.torch import load_file
from torch import nn

from pat_hf.models.factory import create_model
from pat_hf.training.atomic import fsync_folder, write_text_atomically

ONNX_FILE = "model.onnx"
SDPA_OPERATOR = "aten.scaled_dot_product_attention"
INT8_FILE = "model_int8.onnx"
CHECK_FILE = "onnx_check.json"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18  # the dynamo exporter's own opset: lower ones go through ONNX's version converter
FP32_TOLERANCE = 1e-4  # of the logits' range
DEFAULT_MIN_INT8_AGREEMENT = 0.9
QUANTIZED_OPERATORS = ("Conv", "MatMul", "Gemm")
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct")
# A single-file ONNX model is one protobuf, which cannot exceed 2 GiB.
MAX_SINGLE_FILE_BYTES = 2**31 - 2**24

Int8Method = Literal["static", "dynamic"]
Batch = tuple[torch.Tensor, torch.Tensor | None]

_DISPATCH_OPERATOR = re.compile(r"op='(?P<op>[\w.]+)', overload='(?P<overload>\w+)'")
_NODE_TARGET = re.compile(r"target=torch\.ops\.(?P<op>[\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class OnnxExportError(ValueError):
    """The export, or its check, failed; the message is one line saying why and what to do."""


class UnsupportedOperatorError(OnnxExportError):
    """The ONNX exporter has no translation for one of the model's operators (named in `operator`)."""

    def __init__(self, message: str, operator: str):
        super().__init__(message)
        self.operator = operator


class QuantizationError(OnnxExportError):
    """ONNX Runtime could not quantise the fp32 export (which itself was fine)."""


class OnnxCheckError(OnnxExportError):
    """An export was written but failed its check against PyTorch; `result` holds every check."""

    def __init__(self, message: str, result: OnnxExportResult):
        super().__init__(message)
        self.result = result


@dataclass
class OnnxCheck:
    """How one ONNX file compares with the PyTorch model on the evaluation images."""

    file: str
    precision: str  # "fp32" or "int8"
    criterion: str
    size_bytes: int = 0
    images: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # the batch sizes ONNX Runtime ran at
    max_abs_diff: float = 0.0
    logit_range: float = 0.0
    top1_agreement: float = 0.0  # share of images whose top-1 class is PyTorch's
    top1: float | None = None  # accuracy in %, with labels
    passed: bool = False


@dataclass
class OnnxExportResult:
    folder: str
    model: str
    opset: int
    preprocessing: dict[str, Any]
    fp32: OnnxCheck
    int8: OnnxCheck | None = None
    quantization: dict[str, Any] | None = None
    torch_top1: float | None = None  # the PyTorch model's accuracy on the same images, in %

    @property
    def checks(self) -> list[OnnxCheck]:
        return [check for check in (self.fp32, self.int8) if check is not None]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def int8_top1_change(self) -> float | None:
        """The int8 model's top-1 minus PyTorch's, in points."""
        if self.int8 is None or self.int8.top1 is None or self.torch_top1 is None:
            return None
        return self.int8.top1 - self.torch_top1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "int8_top1_change": self.int8_top1_change}

    def summary(self) -> str:
        """One line per file: what it is and how it compares with PyTorch."""
        lines = []
        for check in self.checks:
            accuracy = f", top-1 {check.top1:.2f}% (PyTorch {self.torch_top1:.2f}%)" if check.top1 is not None \
                else ""
            verdict = "passed" if check.passed else "FAILED"
            lines.append(f"{check.file} ({check.size_bytes / 1e6:.2f} MB): {verdict} on {check.images} images, "
                         f"max |logit diff| {check.max_abs_diff:.2e} (logit range {check.logit_range:.3g}), top-1 "
                         f"agreement {check.top1_agreement:.1%}{accuracy}; criterion: {check.criterion}")
        return "\n".join(lines)


def read_preprocessing(folder: str | os.PathLike) -> dict[str, Any]:
    """The preprocessing the exported model expects, from the folder's config.json (`pretrained_cfg`)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file() or not (Path(folder) / "model.safetensors").is_file():
        raise OnnxExportError(f"{folder} is not an exported student folder (config.json and model.safetensors); "
                              f"pass the run's student/ folder")
    pretrained_cfg = json.loads(config_file.read_text()).get("pretrained_cfg", {})
    missing = [key for key in PREPROCESSING_KEYS if pretrained_cfg.get(key) is None]
    if missing:
        raise OnnxExportError(f"{config_file} lacks the preprocessing ({', '.join(missing)} in pretrained_cfg) "
                              f"that ONNX users need; export the student again with pat-hf")
    return {key: pretrained_cfg[key] for key in PREPROCESSING_KEYS}


def load_student_folder(folder: str | os.PathLike) -> nn.Module:
    """The exported student, as timm loads it, in eval mode."""
    try:
        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except TypeError as error:
        if "multiple values for keyword argument" not in str(error):
            raise
    # timm's Mixer/ResMLP entry points hard-code the widths that a narrow student overrides, so timm cannot
    # rebuild it from its config; pat-hf's builder can, from the same config and weights.
    config = json.loads((Path(folder) / "config.json").read_text())
    model = create_model(config["architecture"], config["num_classes"], config.get("model_args", {}))
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model.eval()


def _messages(error: BaseException) -> str:
    """The messages of an error and of the errors behind it."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(_ANSI.sub("", str(error)))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no message")


def exporter_error(error: BaseException, model: str, opset: int) -> OnnxExportError:
    """One line for a failed `torch.onnx.export`: the operator it could not translate when it names one."""
    text = _messages(error)
    dispatch = _DISPATCH_OPERATOR.search(text)
    operator = f"{dispatch['op']}.{dispatch['overload']}" if dispatch else None
    if operator is None:
        node = _NODE_TARGET.search(text)
        operator = node["op"] if node and "Error when translating node" in text else None
    if operator:
        return UnsupportedOperatorError(
            f"{model} cannot be exported to ONNX: the exporter has no translation of the operator {operator} "
            f"(opset {opset}); try another --opset, or a student without that operator", operator)
    innermost = error
    while innermost.__cause__ is not None:
        innermost = innermost.__cause__
    return OnnxExportError(f"{model} cannot be exported to ONNX (opset {opset}): {type(innermost).__name__}: "
                           f"{_first_line(_ANSI.sub('', str(innermost)))[:300]}")


def export_model(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int], *, opset: int = DEFAULT_OPSET,
                 metadata: dict[str, str] | None = None, name: str | None = None) -> None:
    """Export `model` to one ONNX file at `path` with a dynamic batch axis; a failure is one line
    (`UnsupportedOperatorError` when an operator has no translation)."""
    name = name or type(model).__name__
    parameter_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if parameter_bytes > MAX_SINGLE_FILE_BYTES:
        raise OnnxExportError(f"{name} has {parameter_bytes / 2**30:.1f} GiB of weights, more than one ONNX file "
                              f"holds (2 GiB); export a smaller student")
    model.eval()
    # A batch of 2: torch.export treats sizes 0 and 1 as constants, so an example at batch 1 would fix the axis.
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))

    def export() -> torch.onnx.ONNXProgram:
        try:
            with torch.no_grad():
                return torch.onnx.export(
                    model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        except Exception as error:  # the exporter wraps every failure of capture and translation alike
            raise exporter_error(error, name, opset) from error

    try:
        program = export()
    except UnsupportedOperatorError as error:
        # The exporter translates scaled_dot_product_attention for some inputs only (not the 5-D ones of Nest or
        # Hiera, say); timm's attention layers compute the same attention with plain matmuls and a softmax when
        # their fused_attn is off.
        if not error.operator.startswith(SDPA_OPERATOR):
            raise
        with unfused_timm_attention(model) as switched:
            if not switched:
                raise
            program = export()
    program.model.metadata_props.update(metadata or {})
    program.save(path, external_data=False)


@contextlib.contextmanager
def unfused_timm_attention(model: nn.Module) -> Iterator[int]:
    """timm's attention layers of `model` (those with a `fused_attn` switch) computing attention without
    scaled_dot_product_attention; yields how many were switched, and switches them back on exit."""
    fused = [module for module in model.modules() if getattr(module, "fused_attn", False) is True]
    for module in fused:
        module.fused_attn = False
    try:
        yield len(fused)
    finally:
        for module in fused:
            module.fused_attn = True


class _CalibrationImages(CalibrationDataReader):
    """Calibration batches for ONNX Runtime's static quantisation."""

    def __init__(self, images: torch.Tensor, batch_size: int = 32):
        self._batches = iter(images.split(batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch.float().numpy()}


def _check_int8_options(method: str, calibration: torch.Tensor | None) -> None:
    if method not in ("static", "dynamic"):
        raise OnnxExportError(f"unknown int8 method {method!r}; use static or dynamic")
    if method == "static" and (calibration is None or len(calibration) == 0):
        raise OnnxExportError("static int8 quantisation needs calibration images (a subset of the training data)")


def quantize_int8(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, *, method: Int8Method = "static",
                  calibration: torch.Tensor | None = None) -> dict[str, Any]:
    """Quantise an fp32 ONNX file to int8 with ONNX Runtime; returns how (for onnx_check.json)."""
    _check_int8_options(method, calibration)
    prepared = Path(int8_path).with_name("prepared.onnx")
    how = {"method": method, "weights": "int8 per channel", "operators": list(QUANTIZED_OPERATORS)}
    if not _prepare_for_quantization(Path(fp32_path), prepared):
        how["shape_inference"] = "ONNX's (ONNX Runtime's symbolic shape inference failed on this graph)"
    if method == "dynamic":
        quantize_dynamic(prepared, int8_path, op_types_to_quantize=list(QUANTIZED_OPERATORS), per_channel=True,
                         weight_type=QuantType.QInt8)
        how["activations"] = "uint8, ranges computed at run time"
    else:
        quantize_static(prepared, int8_path, _CalibrationImages(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPERATORS), per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        how.update(format="QDQ", activations="uint8, min/max calibrated", calibration_images=len(calibration))
    prepared.unlink()
    return how


def _prepare_for_quantization(fp32_path: Path, prepared: Path) -> bool:
    """ONNX Runtime's recommended pre-processing (shape inference and graph fusions, so that quantisation sees the
    fused operators it will run) of `fp32_path` into `prepared`; False when its symbolic shape inference failed
    on the graph (it gives up, or crashes, on some timm families) and ONNX's own shape inference was used."""
    fp32_path, prepared = fp32_path.resolve(), prepared.resolve()
    # The symbolic shape inference saves its partial model into the working directory when it gives up: from a
    # scratch folder, that file goes away with it instead of staying in the user's.
    with tempfile.TemporaryDirectory(prefix="pat-hf-quantize-") as scratch, contextlib.chdir(scratch):
        try:
            quant_pre_process(str(fp32_path), str(prepared))
            return True
        except Exception as symbolic_error:  # ONNX Runtime raises a bare Exception when it gives up
            try:
                quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            except Exception:
                raise symbolic_error from None
            return False


def _session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    # As many threads as torch uses: the check shares the machine with whatever runs beside it.
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: quantised graphs warn about every unfused node
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _Comparison:
    """Running comparison of one ONNX model's logits with PyTorch's."""

    def __init__(self, session: onnxruntime.InferenceSession):
        self.session = session
        self.max_abs_diff = 0.0
        self.agree = self.correct = self.images = 0
        self.batch_sizes: set[int] = set()

    def add(self, images: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None,
            count: bool = True) -> None:
        logits = torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])
        if logits.shape != reference.shape:
            raise OnnxExportError(f"ONNX Runtime returned logits of shape {tuple(logits.shape)} for a batch of "
                                  f"{len(images)}, PyTorch {tuple(reference.shape)}")
        self.batch_sizes.add(len(images))
        self.max_abs_diff = max(self.max_abs_diff, (logits - reference).abs().max().item())
        if count:
            predicted = logits.argmax(-1)
            self.images += len(images)
            self.agree += (predicted == reference.argmax(-1)).sum().item()
            if labels is not None:
                self.correct += (predicted == labels).sum().item()

    def check(self, check: OnnxCheck, logit_range: float, labelled: bool) -> OnnxCheck:
        check.images, check.batch_sizes = self.images, sorted(self.batch_sizes)
        check.max_abs_diff, check.logit_range = self.max_abs_diff, logit_range
        check.top1_agreement = self.agree / max(self.images, 1)
        check.top1 = 100 * self.correct / self.images if labelled and self.images else None
        return check


def _compare(model: nn.Module, files: dict[str, Path], batches: Iterable[Batch]) -> tuple[dict[str, _Comparison],
                                                                                        float, float | None]:
    """Run PyTorch and each ONNX file on the batches (and on each batch's first image alone, at batch 1)."""
    comparisons = {precision: _Comparison(_session(path)) for precision, path in files.items()}
    low, high, correct, images, labelled = float("inf"), float("-inf"), 0, 0, True
    with torch.no_grad():
        for pixel_values, labels in batches:
            pixel_values = pixel_values.float().cpu()
            reference = model(pixel_values).float()
            low, high = min(low, reference.min().item()), max(high, reference.max().item())
            images += len(pixel_values)
            labelled = labelled and labels is not None
            if labels is not None:
                correct += (reference.argmax(-1) == labels).sum().item()
            for comparison in comparisons.values():
                comparison.add(pixel_values, reference, labels)
                comparison.add(pixel_values[:1], reference[:1], None, count=False)
    if images == 0:
        raise OnnxExportError("no evaluation images to check the export with")
    return comparisons, high - low, 100 * correct / images if labelled else None


def _publish(source: Path, destination: Path) -> None:
    os.replace(source, destination)
    fsync_folder(destination.parent)


def export_student_onnx(folder: str | os.PathLike, batches: Iterable[Batch], *, int8: bool = False,
                        opset: int = DEFAULT_OPSET, int8_method: Int8Method = "static",
                        calibration: torch.Tensor | None = None,
                        min_int8_agreement: float = DEFAULT_MIN_INT8_AGREEMENT) -> OnnxExportResult:
    """Export an exported student folder to `model.onnx` (and, with `int8`, `model_int8.onnx`) in the folder,
    check each against PyTorch on `batches` of (preprocessed images, labels or None), and write onnx_check.json.

    Files that pass are written in one step each; if a check fails, the others still are, onnx_check.json
    records everything, and `OnnxCheckError` says what failed. `calibration`: training images for static int8."""
    folder = Path(folder)
    preprocessing = read_preprocessing(folder)
    if int8:
        _check_int8_options(int8_method, calibration)
    model = load_student_folder(folder)
    name = model.pretrained_cfg.get("architecture") or type(model).__name__
    config = json.loads((folder / "config.json").read_text())
    metadata = {"preprocessing": json.dumps(preprocessing), "source": "pat-hf student: see config.json"}
    if config.get("label_names"):
        metadata["label_names"] = json.dumps(config["label_names"])
    result = OnnxExportResult(
        folder=str(folder), model=name, opset=opset, preprocessing=preprocessing,
        fp32=OnnxCheck(ONNX_FILE, "fp32", f"max |logit diff| <= {FP32_TOLERANCE:g} x logit range"))
    # Written beside their final names (same file system, so the renames are atomic), never seen half-done.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".onnx-export-") as staging:
        files = {"fp32": Path(staging) / ONNX_FILE}
        export_model(model, files["fp32"], preprocessing["input_size"], opset=opset, metadata=metadata, name=name)
        if int8:
            files["int8"] = Path(staging) / INT8_FILE
            try:
                result.quantization = quantize_int8(files["fp32"], files["int8"], method=int8_method,
                                                    calibration=calibration)
            except OnnxExportError:
                raise
            except Exception as error:  # ONNX Runtime's quantiser fails in many ways on unusual graphs
                raise QuantizationError(f"{name}: ONNX Runtime's {int8_method} int8 quantisation failed: "
                                        f"{type(error).__name__}: {_first_line(str(error))[:300]}") from error
            result.int8 = OnnxCheck(INT8_FILE, "int8", f"top-1 agreement with PyTorch >= {min_int8_agreement:.0%}")
        comparisons, logit_range, result.torch_top1 = _compare(model, files, batches)
        labelled = result.torch_top1 is not None
        result.fp32 = comparisons["fp32"].check(result.fp32, logit_range, labelled)
        result.fp32.passed = result.fp32.max_abs_diff <= FP32_TOLERANCE * logit_range
        if result.int8 is not None:
            result.int8 = comparisons["int8"].check(result.int8, logit_range, labelled)
            result.int8.passed = result.int8.top1_agreement >= min_int8_agreement
        for precision, path in files.items():
            check = result.fp32 if precision == "fp32" else result.int8
            check.size_bytes = path.stat().st_size
            if check.passed:
                _publish(path, folder / path.name)
            else:
                (folder / path.name).unlink(missing_ok=True)
    if not int8:
        (folder / INT8_FILE).unlink(missing_ok=True)
    write_check(folder, result)
    failed = [check for check in result.checks if not check.passed]
    if failed:
        raise OnnxCheckError("; ".join(
            f"{check.file} failed its check ({check.criterion}): max |logit diff| {check.max_abs_diff:.2e} for a "
            f"logit range of {check.logit_range:.3g}, top-1 agreement {check.top1_agreement:.1%}"
            for check in failed) + "; not written", result)
    return result


def write_check(folder: str | os.PathLike, result: OnnxExportResult) -> Path:
    path = Path(folder) / CHECK_FILE
    write_text_atomically(path, json.dumps(result.to_dict(), indent=2) + "\n")
    return path



def card_section(result: OnnxExportResult) -> str:
    """The model card's ONNX section: the files, how each compares with PyTorch, and an ONNX Runtime snippet
    that preprocesses an image as the folder's config.json says."""
    rows = []
    for check in result.checks:
        accuracy = f"{check.top1:.2f}" if check.top1 is not None else ""
        rows.append(f"| `{check.file}` | {check.precision} | {check.size_bytes / 1e6:.2f} | "
                    f"{check.max_abs_diff:.1e} | {check.top1_agreement:.1%} | {accuracy} |")
    quantization = ""
    if result.quantization:
        how = result.quantization
        quantization = (f" The int8 file is ONNX Runtime's {how['method']} quantisation of the fp32 one "
                        f"(weights {how['weights']}, activations {how['activations']}).")
    return f"""## ONNX

Exported with `torch.onnx` (opset {result.opset}, dynamic batch axis) and checked against the PyTorch model on
{result.fp32.images} evaluation images (details in `{CHECK_FILE}`).{quantization} The input is preprocessed as
`config.json` says (`pretrained_cfg`).

| file | precision | MB | max logit difference | top-1 agreement with PyTorch | top-1 (%) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

```python
import json

import onnxruntime
import timm
from PIL import Image

config = json.load(open("config.json"))
transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
session = onnxruntime.InferenceSession("{ONNX_FILE}"){f'  # or "{INT8_FILE}"' if result.int8 else ""}
pixel_values = transform(Image.open("image.png").convert("RGB")).unsqueeze(0).numpy()
logits = session.run(["{OUTPUT_NAME}"], {{"{INPUT_NAME}": pixel_values}})[0]
```
"""
