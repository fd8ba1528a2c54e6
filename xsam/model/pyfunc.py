"""An X-SAM export as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri).predict(rows)`.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/xsam@champion")   # the registry alias the evaluation sets
    out = model.predict([{"image": "photo.jpg", "task": "referring", "prompt": "the man on the left"},
                         {"image": png_bytes, "task": "panoptic", "prompt": ["person", "sky", "grass"]}])
    masks = pycocotools.mask.decode(out[0]["masks"][0])          # [H, W] uint8, the image's size

Input: a pandas DataFrame or a list of dicts (a single dict is one row), one request per row:
- `image`: a file path, raw encoded bytes (PNG / JPEG / ...), a base64 string of them, or an
  [H, W, 3] uint8 RGB array;
- `task`: one of xsam.model.predict.PredictTask (panoptic, semantic, instance, referring, reasoning,
  gres, gcg, interactive, vgd);
- `prompt`: the categories (a list, or one comma-separated string) for panoptic / semantic / instance,
  the phrase or question for referring / reasoning / gres, nothing for gcg / interactive / vgd;
- `prompt_masks` (interactive / vgd): a list of COCO RLE dicts or an [R, H, W] bool array.
Output: a list with one dict per row: `masks` (COCO RLE dicts {"size": [H, W], "counts": str}, from
pycocotools, at the image's size), `labels`, `scores`, `text` (GCG caption, else None) and `task`.

The model is the export (xsam.model.export) loaded by `xsam.model.predict.load_for_inference` (the real
loading code, completeness checked); a local export is packed into the MLflow model as the artifact
"export", a remote one (s3://) is named in the model config ("export_uri") and read directly at load time.
Loading needs xsam installed (a pip requirement of the logged model). Settings in the model config:
device / dtype ("auto": cuda + bf16 when a GPU is visible, else cpu + fp32).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

import mlflow.pyfunc
import numpy as np

ARTIFACT = "export"
MODEL_NAME = "model"  # the logged model's name in its run


def _image(value, row: int) -> np.ndarray:
    from PIL import Image

    if isinstance(value, np.ndarray):
        if value.ndim != 3 or value.shape[2] != 3:
            raise ValueError(f"row {row}: image array of shape {value.shape}, want [H, W, 3] uint8 RGB")
        return value.astype(np.uint8)
    if isinstance(value, str):
        if os.path.exists(value):
            return np.asarray(Image.open(value).convert("RGB"))
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"row {row}: image {value[:60]!r} is neither an existing file nor base64") from e
    if isinstance(value, (bytes, bytearray)):
        try:
            return np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))
        except OSError as e:
            raise ValueError(f"row {row}: image bytes are not a readable picture: {e}") from e
    raise ValueError(f"row {row}: image of type {type(value).__name__}: give a path, bytes, base64 or an array")


def _prompt_masks(value, row: int) -> np.ndarray | None:
    from xsam.data import masks as rle

    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value.astype(bool)
    try:
        return np.stack([rle.decode(m).astype(bool) for m in value])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"row {row}: prompt_masks must be COCO RLE dicts or an [R, H, W] array: {e}") from e


def rows_of(model_input) -> list[dict]:
    """The request rows of a DataFrame / list of dicts / dict (module docstring)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return model_input
    raise ValueError(f"input of type {type(model_input).__name__}: give a DataFrame or a list of dicts "
                     "with image, task, prompt")


def encode_masks(masks: np.ndarray) -> list[dict]:
    """[N, H, W] bool -> COCO RLE dicts with str counts (JSON-ready)."""
    from pycocotools import mask as mask_utils

    out = []
    for m in masks:
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        out.append({"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")})
    return out


class XSAMModel(mlflow.pyfunc.PythonModel):
    """pyfunc flavor of an X-SAM stage-3 export: predict(rows) -> masks (RLE), labels, scores."""

    def load_context(self, context):
        from xsam.model.predict import load_for_inference

        config = context.model_config or {}
        export = (context.artifacts or {}).get(ARTIFACT) or config.get("export_uri")
        if not export:
            raise ValueError(f"the MLflow model has neither an {ARTIFACT!r} artifact nor an export_uri in its config")
        self.model, self.tokenizer = load_for_inference(export, device=config.get("device", "auto"),
                                                        dtype=config.get("dtype", "auto"))

    def predict(self, context, model_input, params=None):
        from xsam.model.predict import PredictTask, predict

        out = []
        for k, row in enumerate(rows_of(model_input)):
            missing = [f for f in ("image", "task") if row.get(f) is None]
            if missing:
                raise ValueError(f"row {k}: missing {missing} (each row: image, task, prompt)")
            try:
                task = PredictTask(row["task"])
            except ValueError:
                raise ValueError(f"row {k}: task {row['task']!r}: one of {[t.value for t in PredictTask]}") from None
            prompt = row.get("prompt")
            if isinstance(prompt, np.ndarray):
                prompt = prompt.tolist()
            pred = predict(self.model, self.tokenizer, _image(row["image"], k), task, prompt,
                           _prompt_masks(row.get("prompt_masks"), k))
            out.append({"task": pred.task.value, "masks": encode_masks(pred.masks), "labels": list(pred.labels),
                        "scores": [float(s) for s in pred.scores], "text": pred.text})
        return out


def log_xsam_model(checkpoint: str, device: str = "auto", dtype: str = "auto"):
    """Log the export `checkpoint` as the pyfunc model MODEL_NAME of the ACTIVE MLflow run -> ModelInfo
    (model_uri "models:/<model id>", model_id). Local exports are copied in, remote ones referenced."""
    import xsam
    from xsam.data import storage

    remote = storage.is_uri(checkpoint)
    # models from code: MLflow stores and later runs pyfunc_entry.py (which builds XSAMModel from the installed
    # xsam), so nothing is pickled into the model
    entry = Path(__file__).with_name("pyfunc_entry.py")
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME, python_model=str(entry),
        artifacts=None if remote else {ARTIFACT: str(checkpoint)},
        model_config={"device": device, "dtype": dtype, **({"export_uri": checkpoint} if remote else {})},
        pip_requirements=[f"xsam=={xsam.__version__}"])
