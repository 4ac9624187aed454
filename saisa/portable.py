"""What makes a saved folder say how to open it: an `auto_map` naming a one-line module written beside the weights
(`saisa_auto.py`, which imports saisa's classes), and a model card (README.md).

transformers resolves a folder's `model_type` only once `import saisa` has registered it. Without that import the
`auto_map` is what transformers reads: with `trust_remote_code=True` it runs `saisa_auto.py`, which opens the folder
where saisa is installed and otherwise fails with transformers' own "requires the following packages that were not
found in your environment: saisa. Run `pip install saisa`".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

AUTO_MODULE = "saisa_auto"

_MODULE_DOC = '''"""A saisa model folder (https://pypi.org/project/saisa/). Open it with:

    pip install saisa
    import saisa  # registers the model type with transformers' Auto classes

transformers runs this file only for `trust_remote_code=True`; all it does is import saisa's classes.
"""
'''


def _model_classes(config_class) -> dict[str, type]:
    """Auto class name -> the class saisa registers for `config_class`."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    found = {}
    for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        model_class = auto_class._model_mapping.get(config_class, None)
        if model_class is not None:
            found[auto_class.__name__] = model_class
    return found


def auto_map(config_class) -> dict[str, str]:
    """auto_map for config.json: each Auto class saisa registers `config_class` with, to the class it names."""
    entries = {"AutoConfig": f"{AUTO_MODULE}.{config_class.__name__}"}
    entries.update({name: f"{AUTO_MODULE}.{cls.__name__}" for name, cls in _model_classes(config_class).items()})
    return entries


# Every class an auto_map of ours names, imported by its public name: folders keep opening whatever saisa's internal
# module layout becomes.
PUBLIC_CLASSES = ("SaisaConfig", "SaisaModel", "SaisaForConditionalGeneration", "SaisaProcessor", "SaisaImageProcessor")


def write_auto_module(folder: str | Path) -> None:
    """`saisa_auto.py`: the classes an auto_map of ours names, imported from saisa (which registers the model type)."""
    text = _MODULE_DOC + f"\nfrom saisa import {', '.join(PUBLIC_CLASSES)}  # noqa: F401\n"
    (Path(folder) / f"{AUTO_MODULE}.py").write_text(text)


def add_auto_map(json_file: str | Path, entries: dict[str, str]) -> None:
    """Merge `entries` into a saved JSON file's `auto_map`, and write the module it names beside it."""
    path = Path(json_file)
    data = json.loads(path.read_text())
    data["auto_map"] = {**data.get("auto_map", {}), **entries}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    write_auto_module(path.parent)


def write_model_card(folder: str | Path, config) -> None:
    """README.md saying what the folder holds and how to open it (an existing card is left as it is)."""
    card = Path(folder) / "README.md"
    if card.exists():
        return
    text, vision = config.text_config, config.vision_config
    llm = getattr(text, "_name_or_path", "") or text.model_type
    card.write_text(
        f"""---
library_name: saisa
pipeline_tag: image-text-to-text
tags:
- saisa
- {config.architecture}
---

# A saisa model ({config.architecture})

A `{config.architecture}` multimodal model (saisa: SAISA, LLaVA-1.5 and NAAViT on transformers): LLM `{llm}`
({text.model_type}, {text.num_hidden_layers} layers), vision encoder `{vision.model_type}`.

## Open it

```bash
pip install saisa
```

```python
import saisa  # registers the `saisa` model type with transformers' Auto classes
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("THIS_FOLDER")
processor = AutoProcessor.from_pretrained("THIS_FOLDER")
content = [{{"type": "image", "image": "photo.jpg"}}, {{"type": "text", "text": "What is this?"}}]
messages = [{{"role": "user", "content": content}}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0, inputs["input_ids"].shape[1]:]))
```

`saisa.load_pretrained("THIS_FOLDER")` gives the same (model, processor); `saisa ask`, `saisa chat` and `saisa serve`
take the folder too. Without `import saisa`, transformers does not know the type `saisa`: pass
`trust_remote_code=True` (it runs `{AUTO_MODULE}.py`, which only imports saisa's classes) or import saisa first.
"""
    )
