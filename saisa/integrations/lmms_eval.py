"""lmms-eval plugin, registered through the `lmms_eval.models` entry point (see pyproject.toml), so that

    lmms-eval eval --model saisa --model_args pretrained=DIR --tasks ...

runs without forking the harness. `manifest()` is what the entry point names; the model class is imported by
lmms-eval only when it is used.
"""

from __future__ import annotations


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="saisa", simple_class_path="saisa.integrations.lmms_eval_model.SaisaLMM")
