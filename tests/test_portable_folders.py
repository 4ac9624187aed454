"""Saved folders say how to open them (issue 19): an `auto_map` to a module that imports saisa, and a model card.
Each check runs plain transformers in a subprocess that never imports saisa itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import IMAGE_TOKEN, tiny_chat_processor, tiny_model
from PIL import Image

OPEN = """
import json, sys
{block}
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder = sys.argv[1]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code={trust})
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code={trust})
inputs = processor(text="what <image> ?", images=[Image.new("RGB", (16, 16), "red")], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
print(json.dumps({{"ids": inputs["input_ids"].tolist(), "logits": logits.tolist(),
                  "class": type(model).__name__, "saisa_imported_by_transformers": "saisa" in sys.modules}}))
"""
HIDE_SAISA = """
class NoSaisa:  # as where saisa is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "saisa":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoSaisa())
"""


def _open(folder, tmp_path, *, trust: bool, saisa_installed: bool = True):
    script = OPEN.format(block="" if saisa_installed else HIDE_SAISA, trust=trust)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("portable") / "model"
    tiny_model("saisa").save_pretrained(folder)
    tiny_chat_processor().save_pretrained(folder)
    return folder


def test_trust_remote_code_opens_the_folder_where_saisa_is_installed(folder, tmp_path):
    done = _open(folder, tmp_path, trust=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["class"] == "SaisaForConditionalGeneration" and result["saisa_imported_by_transformers"]
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    inputs = processor(text="what <image> ?", images=[Image.new("RGB", (16, 16), "red")], return_tensors="pt")
    assert result["ids"] == inputs["input_ids"].tolist() and IMAGE_TOKEN in result["ids"][0]
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-5, atol=1e-5)


def test_without_saisa_installed_the_error_says_pip_install_saisa(folder, tmp_path):
    done = _open(folder, tmp_path, trust=True, saisa_installed=False)
    assert done.returncode != 0
    assert "pip install saisa" in done.stderr, done.stderr[-3000:]
    assert "update" not in done.stderr.splitlines()[-1].lower()


def test_without_trust_remote_code_transformers_points_at_the_folder_and_its_card(folder, tmp_path):
    done = _open(folder, tmp_path, trust=False)
    assert done.returncode != 0
    assert "trust_remote_code=True" in done.stderr and str(folder.resolve()) in done.stderr, done.stderr[-3000:]
    assert "Transformers does not recognize this architecture" not in done.stderr
    card = (folder / "README.md").read_text()
    assert "pip install saisa" in card and "import saisa" in card and "AutoModelForImageTextToText" in card
    assert "library_name: saisa" in card


def test_saved_folders_name_their_auto_classes(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "saisa_auto.SaisaConfig"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "saisa_auto.SaisaForConditionalGeneration"
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "saisa_auto.SaisaProcessor"}
    assert (
        "from saisa import SaisaConfig, SaisaModel, SaisaForConditionalGeneration, SaisaProcessor"
        in (folder / "saisa_auto.py").read_text()
    )
