"""The `vllm.general_plugins` entry point: installed with the package, registers the architecture, and never raises
(a plugin that fails breaks every vLLM model in its environment)."""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points

from vllm import ModelRegistry

from saisa.integrations.vllm import ARCHITECTURE, register


def test_the_entry_point_registers_the_architecture():
    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "saisa"]
    plugin.load()()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


def test_a_broken_install_logs_and_leaves_vllm_alone(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "saisa", None)  # `import saisa` now fails, as in a half-installed environment
    with caplog.at_level(logging.WARNING, logger="saisa.integrations.vllm"):
        register()
    assert "not registered" in caplog.text
    assert "LlamaForCausalLM" in ModelRegistry.get_supported_archs()
