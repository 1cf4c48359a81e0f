"""The model card of an exported student: metadata the Hub reads (library, task, dataset, base model, a
model-index with top-1/top-5), the teacher, the distiller's settings, curves and usage snippets.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pat_hf.config.arguments import DataArguments, RunArguments
from pat_hf.data.sources import DatasetSource
from pat_hf.export.cost import cost_table
from pat_hf.export.curves import TRAINING_CURVES_FILE

PROJECT_URL = "https://github.com/pat-hf/pat-hf"
LICENSE = "apache-2.0"
# Run facts that the model-index has no field for, kept in the card's metadata for `pat-hf-push`'s commit message.
CARD_RUN_KEY = "pat_hf"
USAGE_HEADING = "## Usage"
CITATION = """@article{lin2025pat,
  title   = {Perspective-Aware Teaching: Adapting Knowledge for Heterogeneous Distillation},
  author  = {Lin, Jhe-Hao and others},
  journal = {arXiv preprint arXiv:2501.08885},
  year    = {2025}
}"""
# eval_top1, eval_ema_top5, eval_ema1_top1, ...: the raw student's and each EMA student's accuracies.
_ACCURACY_KEY = re.compile(r"^eval_(?:(?P<ema>ema\d*)_)?top(?P<k>[15])$")


@dataclass
class ModelCardInfo:
    student: str
    teacher: str
    teacher_weights: str
    distiller: str
    dataset: str
    eval_split: str | None = None
    dataset_config: str | None = None
    num_classes: int | None = None
    input_size: tuple[int, ...] | None = None
    exported_ema: bool = False
    distiller_settings: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # Filled once the student folder exists: the teacher-vs-student cost facts (export/cost.py) and the ONNX
    # section (export/onnx.py), both measured on the written files.
    cost: dict[str, Any] | None = None
    onnx_section: str | None = None

    @property
    def base_model(self) -> str | None:
        """The teacher's Hub id, when its weights came from the Hub."""
        return self.teacher_weights.removeprefix("hf-hub:") if self.teacher_weights.startswith("hf-hub:") else None

    @property
    def teacher_weights_source(self) -> str | None:
        """Where the teacher's weights came from, without local directories: `hf-hub:ID`, `local-dir:NAME` or
        a checkpoint file's name; None without a teacher."""
        weights = self.teacher_weights
        if not self.teacher or not weights:
            return None
        if self.base_model:
            return weights
        if weights.startswith("local-dir:"):
            return f"local-dir:{Path(weights.removeprefix('local-dir:')).name}"
        return Path(weights).name


def accuracies(metrics: dict[str, float]) -> dict[str, dict[int, float]]:
    """{"raw": {1: top-1, 5: top-5}, "ema": {...}, ...} from the evaluation metrics, in %, two decimals."""
    by_student: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        match = _ACCURACY_KEY.match(key)
        if match:
            by_student.setdefault(match["ema"] or "raw", {})[int(match["k"])] = round(float(value), 2)
    return by_student


def eval_results(info: ModelCardInfo) -> list[EvalResult]:
    """Top-1 and top-5 of the raw student and of each EMA student on the evaluated split."""
    results = []
    for student, values in accuracies(info.metrics).items():
        for k, value in sorted(values.items()):
            metric = "accuracy" if k == 1 else "top_5_accuracy"
            ema = student != "raw"
            results.append(EvalResult(
                task_type="image-classification", task_name="Image Classification", dataset_type=info.dataset,
                dataset_name=info.dataset, dataset_config=info.dataset_config, dataset_split=info.eval_split,
                metric_type=f"{student}_{metric}" if ema else metric,
                metric_name=f"Top-{k} accuracy" + (f" ({student} student)" if ema else ""), metric_value=value))
    return results


def _teacher_weights_text(info: ModelCardInfo) -> str:
    source = info.teacher_weights_source
    if not source:
        return "none: the student was trained on labels alone"
    if info.base_model:
        return f"[{info.base_model}](https://huggingface.co/{info.base_model}) (Hugging Face Hub)"
    if source.startswith("local-dir:"):
        return f"local timm folder `{source.removeprefix('local-dir:')}`"
    return f"checkpoint file `{source}`"


def _settings_list(settings: dict[str, Any]) -> str:
    return "\n".join(f"- `{name}`: `{value}`" for name, value in settings.items()) or "- defaults"


def _evaluation_table(info: ModelCardInfo) -> str:
    by_student = accuracies(info.metrics)
    if not by_student:
        return "Not evaluated."
    split = f", split `{info.eval_split}`" if info.eval_split else ""
    rows = "\n".join(f"| {student} | {values.get(1, '')} | {values.get(5, '')} |"
                     for student, values in by_student.items())
    return f"On `{info.dataset}`{split}:\n\n| student | top-1 (%) | top-5 (%) |\n|---|---|---|\n{rows}"


def usage_section(reference: str, local: bool) -> str:
    """Loading snippets for a Hub repository id or, before a push, for the local export folder."""
    timm_name = f"local-dir:{reference}" if local else f"hf-hub:{reference}"
    return f"""{USAGE_HEADING}

With timm:
```python
import timm
from PIL import Image

model = timm.create_model("{timm_name}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
logits = model(transform(Image.open("image.png").convert("RGB")).unsqueeze(0))
```

With transformers:
```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{reference}")
model = AutoModelForImageClassification.from_pretrained("{reference}").eval()
logits = model(**processor(Image.open("image.png").convert("RGB"), return_tensors="pt")).logits
```

With a pipeline:
```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{reference}")
classifier("image.png", top_k=5)
```
"""


def _cost_section(info: ModelCardInfo) -> str:
    if not info.cost or "teacher" not in info.cost:
        return ""
    return f"\n## Cost: teacher vs student\n\n{cost_table(info.cost)}\n"


def model_card(info: ModelCardInfo, model_name: str, reference: str, local: bool = True,
               with_curves: bool = False) -> ModelCard:
    results = eval_results(info)
    data = ModelCardData(
        model_name=model_name, library_name="timm", pipeline_tag="image-classification", license=LICENSE,
        tags=["image-classification", "timm", "transformers", "knowledge-distillation", "pat-hf"],
        datasets=[info.dataset], metrics=["accuracy"], base_model=info.base_model, eval_results=results or None,
        **{CARD_RUN_KEY: {"student": info.student, "teacher": info.teacher or None,
                          "teacher_weights": info.teacher_weights_source, "distiller": info.distiller,
                          "exported": "ema" if info.exported_ema else "raw"}})
    teacher = f"`{info.teacher}`" if info.teacher else "none"
    input_size = "×".join(map(str, info.input_size)) if info.input_size else "the model's default"
    curves = f"\n## Training curves\n\n![Training curves]({TRAINING_CURVES_FILE})\n" if with_curves else ""
    citation = f"\n## Citation\n\n```bibtex\n{CITATION}\n```\n" if info.distiller == "pat" else ""
    onnx = f"\n{info.onnx_section.strip()}\n" if info.onnx_section else ""
    body = f"""
# {model_name}

A `{info.student}` student distilled from {teacher} with `{info.distiller}` on `{info.dataset}`, trained with
[pat-hf]({PROJECT_URL}).

## Model details

| | |
|---|---|
| student | `{info.student}` ({info.num_classes} classes, input {input_size}) |
| teacher | {teacher} |
| teacher weights | {_teacher_weights_text(info)} |
| distiller | `{info.distiller}` |
| dataset | `{info.dataset}`{f" (config `{info.dataset_config}`)" if info.dataset_config else ""} |
| exported weights | {"the EMA student" if info.exported_ema else "the student (not its EMA)"} |

## Distillation settings

{_settings_list(info.distiller_settings)}

## Training recipe

{_settings_list(info.recipe)}

## Evaluation

{_evaluation_table(info)}
{_cost_section(info)}{curves}
{usage_section(reference, local)}{onnx}{citation}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def with_repo_usage(card: ModelCard, repo_id: str) -> ModelCard:
    """The card with its usage snippets and model name pointing at `repo_id` instead of a local folder."""
    before, _, after = card.text.partition(USAGE_HEADING)
    following = after.find("\n## ")
    card.text = before + usage_section(repo_id, local=False) + (after[following:] if following >= 0 else "")
    card.data.model_name = repo_id.split("/")[-1]
    return card


# timm optimizers that take --momentum.
MOMENTUM_OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "lars")


def dataset_card_name(data: DataArguments, source: DatasetSource | None) -> str:
    """The dataset as the model card names it: its Hub id, or a local folder's name."""
    if source:
        return source.path
    local = data.data_dir or (data.dataset if os.path.isdir(data.dataset) else None)
    return os.path.basename(os.path.normpath(local)) if local else data.dataset


def evaluated_split(eval_set: datasets.Dataset, data: DataArguments, source: DatasetSource | None) -> str | None:
    return data.val_split or (str(eval_set.split) if eval_set.split else None) or (source and source.eval_split)


def distiller_settings(args: RunArguments, distiller_cls: type) -> dict[str, Any]:
    """The distillation hyper-parameters of this run's distiller (a teacher-less one has no KD weight)."""
    settings = {k: v for k, v in args.distiller_hyperparameters().items() if k != "distiller"}
    if not distiller_cls.requires_teacher:
        settings = {k: v for k, v in settings.items() if not k.startswith("kd_")}
    return settings


def recipe_settings(args: RunArguments) -> dict[str, Any]:
    """The recipe values that shaped this run: a step schedule's decay only with --sched step, EMA decays
    only with --model-ema, ...; switches that are off and unset values are left out."""
    recipe = args.recipe
    unused = {"resume", "resume_ignore_changes", "cost_runs", "export_onnx", "export_int8"}
    if recipe.sched != "step":
        unused.add("decay_epochs")
    if recipe.sched not in ("step", "poly"):  # poly's power is --decay-rate
        unused.add("decay_rate")
    if not recipe.model_ema:
        unused.update({"model_ema_decay", "export_ema"})
    if not recipe.amp:
        unused.add("amp_dtype")
    if not any(name in recipe.opt for name in MOMENTUM_OPTIMIZERS):
        unused.add("momentum")
    # Few labels (--label-fraction, --allow-unlabelled) shape what the student learnt from; shown when in use.
    few_labels = {"label_fraction": args.data.label_fraction if args.data.label_fraction < 1 else None,
                  "allow_unlabelled": args.data.allow_unlabelled}
    return {k: v for k, v in {**args.recipe_summary(), **few_labels}.items()
            if k not in unused and v is not None and v is not False and v != []}


def run_card_info(args: RunArguments, distiller_cls: type, source: DatasetSource | None, eval_set: datasets.Dataset,
                  num_classes: int, data_config: dict[str, Any], metrics: dict[str, float],
                  labelled_examples: int | None = None) -> ModelCardInfo:
    """What the model card of a finished run says: the pair, the data, the settings that shaped it, its metrics;
    `labelled_examples`: how many training examples kept their label, when some did not."""
    recipe = recipe_settings(args)
    if labelled_examples is not None:
        recipe["labelled_examples"] = labelled_examples
    return ModelCardInfo(
        student=args.model.model, teacher=args.model.teacher, teacher_weights=args.model.teacher_pretrained,
        distiller=args.distill.distiller, dataset=dataset_card_name(args.data, source),
        eval_split=evaluated_split(eval_set, args.data, source), dataset_config=args.data.dataset_config_name,
        num_classes=num_classes, input_size=tuple(data_config["input_size"]), exported_ema=args.recipe.export_ema,
        distiller_settings=distiller_settings(args, distiller_cls), recipe=recipe, metrics=metrics)
