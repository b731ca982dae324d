"""Publishing: the model card (`hope_hf.cards`), the checked-in preset cards, and `hope_hf.hub.push_to_hub` with the
Hub client replaced by a local fake (no network)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard, constants
from transformers import AutoModelForCausalLM, ByT5Tokenizer

import hope_hf
from hope_hf import HopeForCausalLM, hub
from hope_hf.cards import (
    DEFAULT_TAGS,
    build_model_card,
    card_template_path,
    main as cards_main,
    preset_card,
    preset_card_filename,
    write_preset_cards,
)
from hope_hf.configuration_hope import RUNTIME_SWITCHES
from hope_hf.hub import MODEL_CODE_FILES, HubPublishError, push_to_hub
from hope_hf.modeling_hope import HOPE_AUTO_MAP
from hope_hf.presets import available_presets, get_preset

from conftest import small_config


REPO = Path(__file__).resolve().parents[2]
MODEL_CARDS = REPO / "model_cards"
MODEL_FILES = sorted(["config.json", "generation_config.json", "model.safetensors", *MODEL_CODE_FILES])
EVAL = {
    "task_type": "text-generation",
    "dataset_type": "hope-stdlib",
    "dataset_name": "Python stdlib sources (held out)",
    "dataset_split": "eval",
    "metric_type": "perplexity",
    "metric_value": 17.25,
}
TRAINING = {"data": "Python standard library sources", "tokens": "2.1M", "optimizer": "AdamW + ContinuumOptimizer"}


class FakeHub:
    """Stands in for `huggingface_hub.HfApi`: records calls, and keeps a copy of every uploaded folder."""

    def __init__(self, root: Path, fail: BaseException | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail
        self.root = root

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
        call = dict(repo_id=repo_id, private=private, exist_ok=exist_ok, repo_type=repo_type)
        self.calls.append(("create_repo", call))
        if self.fail is not None:
            raise self.fail
        return f"https://hub.invalid/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, revision=None, create_pr=None, commit_message=None,
                      **kwargs):
        self.calls.append(("upload_folder", dict(repo_id=repo_id, repo_type=repo_type, revision=revision,
                                                 create_pr=create_pr, commit_message=commit_message, **kwargs)))
        shutil.copytree(folder_path, self.root / repo_id)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/0", oid="0" * 40)

    def uploaded(self, repo_id) -> list[str]:
        folder = self.root / repo_id
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def online(monkeypatch):
    """The tests run with HF_HUB_OFFLINE=1; the fake hub needs no network, so let the helper believe it is online."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _model_and_tokenizer():
    tokenizer = ByT5Tokenizer()
    config = small_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    return HopeForCausalLM(config).eval(), tokenizer


def _json_block(text: str) -> dict:
    return json.loads(re.search(r"```json\n(.*?)\n```", text, re.S).group(1))


# ------------------------------------------------------------------------------------------------------ push_to_hub
def test_push_uploads_exactly_the_expected_files_and_a_card_that_parses(online, tmp_path):
    model, tokenizer = _model_and_tokenizer()
    tokenizer_files = sorted(Path(f).name for f in tokenizer.save_pretrained(tmp_path / "tok"))
    fake = FakeHub(tmp_path / "hub")
    result = push_to_hub(
        model, "someone/hope-test", tokenizer=tokenizer, training=TRAINING, eval_results=[EVAL],
        datasets=["hope-stdlib"], tags=["tiny"], api=fake, private=True,
    )

    assert [name for name, _ in fake.calls] == ["create_repo", "upload_folder"]
    assert fake.calls[0][1] == dict(repo_id="someone/hope-test", private=True, exist_ok=True, repo_type="model")
    assert fake.calls[1][1]["repo_id"] == "someone/hope-test" and fake.calls[1][1]["repo_type"] == "model"
    expected = sorted(["README.md", *MODEL_FILES, *tokenizer_files])
    assert fake.uploaded("someone/hope-test") == expected == result.files
    assert result.uploaded and result.commit_url.endswith("/commit/0") and result.folder is None  # tmp folder removed

    uploaded = fake.root / "someone/hope-test"
    for name in hub.MODEL_CODE_FILES:
        assert (uploaded / name).read_bytes() == (Path(hope_hf.__file__).parent / name).read_bytes()
    assert json.loads((uploaded / "config.json").read_text())["auto_map"] == HOPE_AUTO_MAP

    card = ModelCard.load(uploaded / "README.md")
    data = card.data
    assert data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation" and data.language == "en"
    assert data.tags == [*DEFAULT_TAGS, "tiny"] and "custom_code" in data.tags
    assert data.datasets == ["hope-stdlib"]
    assert data.model_name == "hope-test"
    (res,) = data.eval_results
    assert {k: getattr(res, k) for k in EVAL} == EVAL
    index = data.to_dict()["model-index"]
    assert index[0]["name"] == "hope-test"
    assert index[0]["results"][0]["metrics"] == [{"type": "perplexity", "value": 17.25}]
    # the body: the exact config, CMS levels and periods, chunk size, training, results, citation, usage
    text = card.text
    config = model.config
    exact = _json_block(text)
    assert exact["model_type"] == "nested_hope"
    assert {k: v for k, v in exact.items() if k != "model_type"} == {
        k: getattr(config, k) for k in exact if k != "model_type"
    }
    assert exact["cms_levels"] == config.cms_levels and exact["chunk_size"] == 4 and exact["num_hidden_layers"] == 2
    saved = json.loads((uploaded / "config.json").read_text())  # the card's config holds what config.json holds
    assert set(exact) <= set(saved) and not set(exact) & set(RUNTIME_SWITCHES)
    assert "| Titans chunk size | 4 tokens |" in text
    assert "| 1 | 0 (frozen) | 48 |" in text and "| 2 | 16 | 24 |" in text
    assert "- **data**: Python standard library sources" in text and "- **tokens**: 2.1M" in text
    assert "| perplexity | 17.25 |" in text
    assert "arXiv:2512.24695" in text and "## Intended use" in text and "## Limitations" in text
    assert 'from_pretrained("someone/hope-test", trust_remote_code=True)' in text

    # what was uploaded loads and computes what the model computes
    ids = torch.randint(3, 300, (2, 11))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(uploaded)(ids).logits, model(ids).logits)


def test_push_is_refused_offline_before_anything_is_uploaded(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, tokenizer = _model_and_tokenizer()
    fake = FakeHub(tmp_path / "hub")
    with pytest.raises(HubPublishError, match=r"offline mode \(HF_HUB_OFFLINE=1\), so nothing was uploaded"):
        push_to_hub(model, "someone/hope-test", tokenizer=tokenizer, training=TRAINING, api=fake,
                    save_directory=tmp_path / "out")
    assert fake.calls == [] and not (tmp_path / "out").exists()


def _http_error(status: int) -> OSError:
    """Shaped like huggingface_hub's HfHubHTTPError (an OSError with a `response`)."""
    return type("HfHubHTTPError", (OSError,), {"response": SimpleNamespace(status_code=status)})(f"HTTP {status}")


@pytest.mark.parametrize(
    "error, message",
    [
        (ConnectionError("[Errno -2] Name or service not known"), "Could not reach the Hugging Face Hub"),
        (type("LocalTokenNotFoundError", (OSError,), {})("no token"), "not logged in"),
        (_http_error(403), "not logged in"),
        (_http_error(500), "HTTP 500"),
    ],
)
def test_push_without_the_hub_fails_clearly_and_uploads_nothing(online, error, message, tmp_path):
    model, tokenizer = _model_and_tokenizer()
    fake = FakeHub(tmp_path / "hub", fail=error)
    with pytest.raises(HubPublishError, match=message) as info:
        push_to_hub(model, "someone/hope-test", tokenizer=tokenizer, training=TRAINING, api=fake)
    assert "Nothing was uploaded" in str(info.value)
    assert [name for name, _ in fake.calls] == ["create_repo"]


def test_dry_run_writes_the_folder_and_touches_no_hub(tmp_path):
    # runs under HF_HUB_OFFLINE=1: a dry run needs no network
    model, tokenizer = _model_and_tokenizer()
    fake = FakeHub(tmp_path / "hub", fail=AssertionError("no call expected"))
    result = push_to_hub(model, "hope-dry", tokenizer=tokenizer, training="Untrained.", dry_run=True,
                         save_directory=tmp_path / "dry", api=fake)
    assert fake.calls == []
    assert not result.uploaded and result.folder == tmp_path / "dry"
    assert set(MODEL_FILES) | {"README.md"} <= set(result.files)
    assert result.card.data.model_name == "hope-dry" and result.card.data.eval_results is None
    assert "No evaluation results are reported for this model." in result.card.text


def test_publish_errors_name_the_problem(tmp_path):
    model, tokenizer = _model_and_tokenizer()
    with pytest.raises(ValueError, match="must say how the model was trained"):
        push_to_hub(model, "x/y", tokenizer=tokenizer, dry_run=True, save_directory=tmp_path / "a")
    with pytest.raises(HubPublishError, match="repo_id must look like"):
        push_to_hub(model, "a/b/c", training="t", dry_run=True)
    with pytest.raises(HubPublishError, match="publishes HOPE models"):
        push_to_hub(torch.nn.Linear(2, 2), "x/y", training="t", dry_run=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "stale.bin").write_bytes(b"0")
    with pytest.raises(HubPublishError, match="is not empty"):
        push_to_hub(model, "x/y", training="t", dry_run=True, save_directory=tmp_path / "full")
    small = ByT5Tokenizer()
    tiny_vocab = HopeForCausalLM(small_config(vocab_size=100))
    with pytest.raises(HubPublishError, match="the tokenizer does not fit the model"):
        push_to_hub(tiny_vocab, "x/y", tokenizer=small, training="t", dry_run=True, save_directory=tmp_path / "b")
    with pytest.raises(ValueError, match=r"eval_results\[0\] is not a valid huggingface_hub EvalResult"):
        build_model_card(model.config, model_name="m", training="t", eval_results=[{"metric_value": 1.0}])


# ------------------------------------------------------------------------------------------------------ preset cards
def test_checked_in_cards_equal_the_generator():
    assert write_preset_cards(MODEL_CARDS, check=True) == [], "run `python -m hope_hf.cards`"
    for name in available_presets():
        assert (MODEL_CARDS / preset_card_filename(name)).read_text() == str(preset_card(name)) + "\n"
    assert sorted(p.name for p in MODEL_CARDS.glob("*.md")) == sorted(
        ["template.md", *(preset_card_filename(n) for n in available_presets())]
    )
    assert cards_main(["--check"]) == 0


def test_the_generator_check_reports_stale_cards(tmp_path, capsys):
    assert write_preset_cards(tmp_path) == [tmp_path / preset_card_filename(n) for n in available_presets()]
    (tmp_path / "hope-tiny.md").write_text("edited by hand\n")
    assert cards_main(["--check", "--output-dir", str(tmp_path)]) == 1
    assert "hope-tiny.md" in capsys.readouterr().err


def test_the_packaged_template_is_the_model_cards_template():
    assert card_template_path().read_text() == (MODEL_CARDS / "template.md").read_text()
    assert (Path(hope_hf.__file__).parent / "model_card_template.md").read_text() == (
        MODEL_CARDS / "template.md"
    ).read_text()


@pytest.mark.parametrize("name", ["tiny", "340m"])
def test_preset_cards_parse_and_state_the_exact_config(name):
    card = ModelCard.load(MODEL_CARDS / preset_card_filename(name))
    config = get_preset(name)
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.tags == DEFAULT_TAGS and card.data.model_name == f"hope-{name}"
    assert card.data.eval_results is None  # an untrained preset reports no results
    exact = _json_block(card.text)
    assert {k: v for k, v in exact.items() if k != "model_type"} == {
        k: getattr(config, k) for k in exact if k != "model_type"
    }
    assert f"| Titans chunk size | {config.chunk_size} tokens |" in card.text
    for i, level in enumerate(config.cms_levels, start=1):
        period = level["period"]
        assert re.search(rf"\| {i} \| {period:,}( \(2\^\d+\))? \| {level['intermediate_size']} \|", card.text)
    assert f"| layers | {config.num_hidden_layers}: " in card.text
    assert "Untrained" in card.text and "arXiv:2512.24695" in card.text
