"""Hub custom code: a saved HOPE folder carries its model code and loads with `trust_remote_code=True` in a process
where `hope_hf` cannot be imported (docs/design.md §1 and §13 "Hub custom code"; invariant 7 of docs/design.md §14).

The fresh process runs with a `sitecustomize` that puts an import blocker for `hope_hf` first on `sys.meta_path`
(before the editable-install finder and the path finder), with `HF_MODULES_CACHE` in a tmp dir and the network off.
In-process loading cannot test this: a locally registered class beats remote code even with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer, pipeline

import hope_hf
from hope_hf import HopeConfig, HopeForCausalLM, HopeModel
from hope_hf.hub import MODEL_CODE_FILES
from hope_hf.modeling_hope import HOPE_AUTO_MAP

from conftest import small_config


PACKAGE_DIR = Path(hope_hf.__file__).resolve().parent
# the model's code: modeling_hope.py, configuration_hope.py and every flat sibling they import (derived from the
# imports by the package; pinned here by its size and its members' names)
MODEL_FILES = list(MODEL_CODE_FILES)
assert len(MODEL_FILES) == 14 and {"memory_hope.py", "memory_scan.py", "cache_hope.py", "layers_hope.py",
                                "checks_hope.py"} <= set(MODEL_FILES)
SAVED_FILES = sorted(["config.json", "generation_config.json", "model.safetensors", *MODEL_FILES])

BLOCKER = '''
import sys


class _BlockHopeHF:
    """Refuse every import of hope_hf: the remote-code load must work from the saved folder alone."""

    def find_spec(self, name, path=None, target=None):
        if name == "hope_hf" or name.startswith("hope_hf."):
            raise ImportError(f"hope_hf is blocked in this process (test_remote_code): import of {name!r}")
        return None


sys.meta_path.insert(0, _BlockHopeHF())
'''

FRESH_PROCESS = '''
import json, sys
import torch

try:
    import hope_hf  # noqa: F401
except ImportError as err:
    blocked = "blocked" in str(err)
else:
    blocked = False
assert blocked, "the import blocker did not stop `import hope_hf`"

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

folder, out_dir = sys.argv[1], sys.argv[2]
torch.set_num_threads(int(sys.argv[3]))  # the parent's count: kernels may sum in another order with other counts
ref = torch.load(f"{out_dir}/reference.pt")
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
base = AutoModel.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    logits = model(ref["ids"]).logits
    hidden = base(ref["ids"]).last_hidden_state
out = model.generate(ref["prompt"], max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]  # renamed in Transformers 5.24
text = pipeline("text-generation", model=model, tokenizer=tokenizer)(
    "Nested learning", min_new_tokens=8, max_new_tokens=8, do_sample=False, return_tensors=True
)[0]["generated_token_ids"]
model.save_pretrained(f"{out_dir}/resaved")
result = {
    "logits_equal": bool(torch.equal(logits, ref["logits"])),
    "max_abs_diff": float((logits - ref["logits"]).abs().max()),
    "hidden_equal": bool(torch.equal(hidden, ref["hidden"])),
    "generated": out.sequences.tolist(),
    "pipeline_ids": list(text),
    "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
    "base_class": f"{type(base).__module__}.{type(base).__qualname__}",
    "config_class": f"{type(config).__module__}.{type(config).__qualname__}",
    "cache_class": f"{type(cache).__module__}.{type(cache).__qualname__}",
    "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
    "training": model.training,
    "hope_modules": sorted(name for name in sys.modules if name == "hope_hf" or name.startswith("hope_hf.")),
}
with open(f"{out_dir}/result.json", "w") as f:
    json.dump(result, f)
'''

pytestmark = pytest.mark.usefixtures("one_thread")


def _model_and_tokenizer():
    tokenizer = ByT5Tokenizer()
    config = small_config(
        "hybrid", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    return HopeForCausalLM(config).eval(), tokenizer


def test_import_registers_the_code_for_every_auto_class(tmp_path):
    """Decision (docs/design.md): `import hope_hf` calls `register_for_auto_class`, so every plain
    `save_pretrained` writes the four model files and an `auto_map` for AutoConfig, AutoModel and
    AutoModelForCausalLM, whichever class is saved."""
    assert HopeConfig._auto_class == "AutoConfig"
    assert HopeModel._auto_class == "AutoModel"
    assert HopeForCausalLM._auto_class == "AutoModelForCausalLM"
    model, _ = _model_and_tokenizer()
    model.save_pretrained(tmp_path / "lm")
    HopeModel(model.config).save_pretrained(tmp_path / "base")
    assert sorted(os.listdir(tmp_path / "lm")) == SAVED_FILES
    assert sorted(os.listdir(tmp_path / "base")) == [f for f in SAVED_FILES if f != "generation_config.json"]
    for folder in ("lm", "base"):
        saved = json.loads((tmp_path / folder / "config.json").read_text())
        assert saved["auto_map"] == HOPE_AUTO_MAP
        for name in MODEL_FILES:  # the package's own files, byte for byte
            assert (tmp_path / folder / name).read_bytes() == (PACKAGE_DIR / name).read_bytes()
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["architectures"] == ["HopeForCausalLM"]
    assert json.loads((tmp_path / "base" / "config.json").read_text())["architectures"] == ["HopeModel"]


def test_model_files_import_only_flat_siblings():
    """`custom_object_save` follows only `from .x import y`; the model files must import nothing else of hope_hf."""
    for name in MODEL_FILES:
        source = (PACKAGE_DIR / name).read_text()
        for line in source.splitlines():
            stripped = line.strip()
            assert "hope_hf" not in stripped or not stripped.startswith(("import ", "from ")), (name, line)
            if stripped.startswith("from ."):
                module = stripped.split()[1][1:]
                assert "." not in module and f"{module}.py" in MODEL_FILES, (name, line)


def test_trust_remote_code_in_a_fresh_process_without_hope_hf(tmp_path):
    model, tokenizer = _model_and_tokenizer()
    folder = tmp_path / "hope-remote"
    model.save_pretrained(folder)
    tokenizer_files = [Path(f).name for f in tokenizer.save_pretrained(folder)]
    assert "tokenizer_config.json" in tokenizer_files
    assert sorted(os.listdir(folder)) == sorted(SAVED_FILES + tokenizer_files)

    torch.manual_seed(1)
    ids = torch.randint(3, len(tokenizer), (2, 23))  # 23: not a multiple of the chunk size (4)
    prompt = torch.randint(3, len(tokenizer), (1, 7))
    with torch.no_grad():
        logits = model(ids).logits
        hidden = model.model(ids).last_hidden_state
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False)
    pipeline_ids = list(
        pipeline("text-generation", model=model, tokenizer=tokenizer)(
            "Nested learning", min_new_tokens=8, max_new_tokens=8, do_sample=False, return_tensors=True
        )[0]["generated_token_ids"]
    )
    assert len(pipeline_ids) == len(tokenizer("Nested learning").input_ids) + 8  # prompt (with </s>) + 8 new
    torch.save({"ids": ids, "prompt": prompt, "logits": logits, "hidden": hidden}, tmp_path / "reference.pt")

    blocker_dir = tmp_path / "blocker"
    blocker_dir.mkdir()
    (blocker_dir / "sitecustomize.py").write_text(BLOCKER)
    script = tmp_path / "fresh_process.py"
    script.write_text(textwrap.dedent(FRESH_PROCESS))
    env = {k: v for k, v in os.environ.items() if k != "HF_MODULES_CACHE"}
    # the blocker first; other entries stay (e.g. another Transformers release under test)
    python_path = [str(blocker_dir), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        PYTHONPATH=os.pathsep.join(python_path),
        HF_MODULES_CACHE=str(tmp_path / "modules_cache"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path), str(torch.get_num_threads())],
        cwd=tmp_path,  # not the repository root: nothing of hope_hf on the path but the blocked install
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())

    assert result["hope_modules"] == []
    # the classes came from the folder's code, copied into the modules cache
    assert result["model_class"].startswith("transformers_modules.") and result["model_class"].endswith(
        "modeling_hope.HopeForCausalLM"
    )
    assert result["base_class"].endswith("modeling_hope.HopeModel") and result["base_class"].startswith(
        "transformers_modules."
    )
    assert result["config_class"].startswith("transformers_modules.")
    assert result["config_class"].endswith("configuration_hope.HopeConfig")
    assert result["cache_class"].startswith("transformers_modules.")
    assert result["cache_class"].endswith("cache_hope.HopeCache")
    assert list((tmp_path / "modules_cache").rglob("memory_hope.py"))
    # identical numbers, tied weights, eval mode, the same greedy continuation
    assert result["logits_equal"], result["max_abs_diff"]
    assert result["hidden_equal"]
    assert result["tied"] and not result["training"]
    assert result["generated"] == generated.tolist()
    assert result["pipeline_ids"] == pipeline_ids
    # a model loaded as remote code saves its code again, with the full auto_map
    resaved = tmp_path / "resaved"
    assert sorted(os.listdir(resaved)) == SAVED_FILES
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == HOPE_AUTO_MAP
    for name in MODEL_FILES:
        assert (resaved / name).read_bytes() == (PACKAGE_DIR / name).read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(resaved).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
