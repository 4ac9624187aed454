from saisa.data.llava_json import Collator, LlavaJsonDataset
from saisa.data.templates import TEMPLATES, TemplateMismatchError, get_template, tokenize_with_labels

__all__ = ["Collator", "LlavaJsonDataset", "TEMPLATES", "TemplateMismatchError", "get_template", "tokenize_with_labels"]
