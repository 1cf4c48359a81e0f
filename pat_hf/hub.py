"""Exporting the distilled student in timm's Hub format, with a model card, and pushing it to the Hub.

The folder holds `config.json`, `model.safetensors` and `README.md`. It loads with
`timm.create_model("local-dir:DIR", pretrained=True)` and with transformers'
`AutoModelForImageClassification.from_pretrained(DIR)` (as a `TimmWrapper` model), with the same logits.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timm.models import save_for_hf
from torch import nn

CITATION = """@article{lin2025pat,
  title   = {Perspective-Aware Teaching: Adapting Knowledge for Heterogeneous Distillation},
  author  = {Lin, Jhe-Hao and others},
  journal = {arXiv preprint arXiv:2501.08885},
  year    = {2025}
}"""


@dataclass
class ModelCardInfo:
    student: str
    teacher: str
    distiller: str
    dataset: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def _yaml_list(values: list[str]) -> str:
    return "\n".join(f"- {value}" for value in values)


def model_card(info: ModelCardInfo, repo_or_dir: str = "DIR") -> str:
    teacher = info.teacher or "none (trained on labels alone)"
    rows = "\n".join(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in info.metrics.items())
    settings = "\n".join(f"- `{k}`: `{v}`" for k, v in {**info.hyperparameters, **info.recipe}.items())
    tags = ["image-classification", "timm", "transformers", "knowledge-distillation", "pat-hf"]
    return f"""---
tags:
{_yaml_list(tags)}
library_name: timm
pipeline_tag: image-classification
license: apache-2.0
---
# {info.student} distilled with {info.distiller.upper()}

A `{info.student}` student trained by knowledge distillation with pat-hf on `{info.dataset}`.

## Model details
- **Student:** `{info.student}`
- **Teacher:** `{teacher}`
- **Distiller:** `{info.distiller}`
- **Dataset:** `{info.dataset}`

## Recipe
{settings or "- defaults"}

## Evaluation
| metric | value |
|---|---|
{rows or "| (not evaluated) | |"}

## Usage
```python
import timm
model = timm.create_model("hf-hub:{repo_or_dir}", pretrained=True)  # or "local-dir:PATH"

from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained("{repo_or_dir}")
```

## Citation
```bibtex
{CITATION}
```
"""


def export_student(student: nn.Module, directory: str | Path, *, model_kwargs: dict[str, Any],
                   data_config: dict[str, Any], class_names: list[str] | None, card: ModelCardInfo) -> Path:
    """Write the student alone in timm's Hub format; the folder appears complete or not at all."""
    directory = Path(directory)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model_config = {"label_names": class_names} if class_names else None
    # transformers' TimmWrapper passes num_classes itself: a second copy in model_args makes it fail.
    model_args = {k: v for k, v in model_kwargs.items() if k != "num_classes"}
    save_for_hf(student, staging, model_config=model_config, model_args=model_args, safe_serialization=True,
                data_config={k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")})
    config_path = staging / "config.json"
    config = json.loads(config_path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    config_path.write_text(json.dumps(config, indent=2))
    (staging / "README.md").write_text(model_card(card))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


def push_student(directory: str | Path, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Upload an exported student folder (not a training checkpoint) to a Hub model repository."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    readme = Path(directory) / "README.md"
    readme.write_text(readme.read_text().replace('"hf-hub:DIR"', f'"hf-hub:{repo_id}"')
                      .replace('from_pretrained("DIR")', f'from_pretrained("{repo_id}")'))
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message="Add distilled student")
    return commit.commit_url
