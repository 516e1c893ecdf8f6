"""evaluate.py's default result file: beside a model folder, in the current directory for a hub name, and never a
folder created under the hub name (it would shadow the hub model in every later load from this directory)."""
import os
import types

from lmcompress.evaluation import default_output_file


def _args(model, output_file=None):
    return types.SimpleNamespace(model_name_or_path=model, output_file=output_file)


def test_beside_a_model_folder(tmp_path):
    assert default_output_file(_args(str(tmp_path))) == os.path.join(str(tmp_path), "perplexity.json")


def test_current_directory_for_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_output_file(_args("gpt2")) == os.path.join(".", "perplexity.json")
    assert default_output_file(_args("openai-community/gpt2")) == os.path.join(".", "perplexity.json")
    assert not os.path.exists("gpt2") and not os.path.exists("openai-community")


def test_an_explicit_file_wins(tmp_path):
    assert default_output_file(_args(str(tmp_path), "out/result.json")) == "out/result.json"
