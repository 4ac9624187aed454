"""lmms-eval plugin, registered through the `lmms_eval.models` entry point (see pyproject.toml), so that

    lmms-eval eval --model saisa --model_args pretrained=DIR --tasks ...

runs without forking the harness. `--model saisa` is the "simple" interface (context string + images; generation and
loglikelihood tasks), `--model saisa_chat` the chat interface (the task's messages through the model's chat template;
lmms-eval 0.7.3 builds chat requests for generation tasks only, so multiple-choice tasks need `saisa`).
`manifest()` is what the entry point names; the model classes are imported by lmms-eval only when used.
"""

from __future__ import annotations


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    path = "saisa.integrations.lmms_eval_model"
    return (
        ModelManifest(model_id="saisa", simple_class_path=f"{path}.SaisaLMM"),
        ModelManifest(model_id="saisa_chat", chat_class_path=f"{path}.SaisaChatLMM"),
    )
