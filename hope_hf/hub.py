"""Publish a HOPE model to the Hugging Face Hub: model, tokenizer, model code and model card in one commit.

    from hope_hf.hub import push_to_hub
    result = push_to_hub(model, "me/hope-tiny-stdlib", tokenizer=tokenizer,
                         training={"data": "...", "tokens": "...", "optimizer": "..."},
                         eval_results=[{"task_type": "text-generation", "dataset_type": "...", "dataset_name": "...",
                                        "metric_type": "perplexity", "metric_value": 12.3}])

Steps: write the folder (`model.save_pretrained`, which also writes the model's code files, `MODEL_CODE_FILES`, and
the `auto_map`; `tokenizer.save_pretrained`; `README.md` from
`hope_hf.cards.build_model_card`), check it, then `create_repo(exist_ok=True)` and one `upload_folder` commit.
`dry_run=True` stops after writing the folder. Offline (`HF_HUB_OFFLINE=1`), or when the Hub cannot be reached, it
raises `HubPublishError` before anything is uploaded.

Why not `model.push_to_hub`: Transformers' `push_to_hub` loads the README already on the Hub (or writes a minimal
one) instead of the card written here, and pushes model and tokenizer in separate commits.

Not model code: the modeling files never import this module.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, constants

from .cards import build_model_card
from .configuration_hope import HopeConfig
from .modeling_hope import HOPE_AUTO_MAP


__all__ = ["MODEL_CODE_FILES", "HubPublishError", "PublishResult", "push_to_hub", "save_for_hub"]

def model_code_files() -> tuple[str, ...]:
    """The code files `save_pretrained` of a HOPE model writes next to the weights: `modeling_hope.py`,
    `configuration_hope.py` and, recursively, every flat sibling they import with `from .x import y` (what
    Transformers copies for `trust_remote_code`), sorted."""
    root, todo, seen = Path(__file__).parent, ["modeling_hope", "configuration_hope"], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += re.findall(r"^\s*from \.(\w+) import", (root / f"{name}.py").read_text(encoding="utf-8"), re.M)
    return tuple(sorted(f"{name}.py" for name in seen))


MODEL_CODE_FILES = model_code_files()
CARD_FILE = "README.md"


class HubPublishError(RuntimeError):
    """Publishing failed; the message says why and whether anything reached the Hub."""


@dataclass
class PublishResult:
    repo_id: str
    folder: Path | None  # the folder uploaded (None once a temporary one is removed) or, with dry_run, written
    files: list[str]  # its files, sorted, relative to `folder`
    card: ModelCard
    uploaded: bool = False
    commit: Any = None  # huggingface_hub.CommitInfo of the upload
    repo_url: Any = None

    @property
    def commit_url(self) -> str | None:
        return getattr(self.commit, "commit_url", None)


def _is_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) once, when it is imported
    return bool(constants.HF_HUB_OFFLINE)


def _check_model(model) -> HopeConfig:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != HopeConfig.model_type or not hasattr(model, "save_pretrained"):
        raise HubPublishError(
            f"push_to_hub publishes HOPE models (model_type {HopeConfig.model_type!r}); got "
            f"{type(model).__name__} with model_type {getattr(config, 'model_type', None)!r}"
        )
    if type(model)._auto_class is None:
        raise HubPublishError(
            f"{type(model).__name__} is not registered for the Auto classes, so save_pretrained would not write the "
            "model code and the repository would not load with trust_remote_code=True; `import hope_hf` registers it"
        )
    return config


def _list_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def save_for_hub(
    model,
    save_directory: str | Path,
    *,
    tokenizer=None,
    card: ModelCard | None = None,
    max_shard_size: str | int | None = None,
    **card_kwargs,
) -> list[str]:
    """Write what `push_to_hub` uploads into `save_directory`: weights, config with `auto_map`, the four model
    files, the tokenizer (if given) and `README.md` (the given `card`, else `build_model_card(model.config,
    **card_kwargs)`). Returns the files written, sorted. The folder must be empty or not exist."""
    config = _check_model(model)
    folder = Path(save_directory)
    if folder.exists() and any(folder.iterdir()):
        raise HubPublishError(
            f"{folder} is not empty: save_for_hub writes a fresh folder, so that only its own files are uploaded"
        )
    if tokenizer is not None:
        from .tokenizer import check_tokenizer_matches

        try:
            check_tokenizer_matches(tokenizer, config)
        except ValueError as err:
            raise HubPublishError(f"the tokenizer does not fit the model: {err}") from err
    if card is None:
        card = build_model_card(config, **card_kwargs)
    elif card_kwargs:
        raise HubPublishError(f"give card= or card fields ({', '.join(card_kwargs)}), not both")
    folder.mkdir(parents=True, exist_ok=True)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    card.save(folder / CARD_FILE)

    missing = [name for name in (*MODEL_CODE_FILES, "config.json") if not (folder / name).is_file()]
    if missing:
        raise HubPublishError(f"save_pretrained did not write {missing} to {folder}; the repository would not load")
    auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map") or {}
    if any(auto_map.get(key) != value for key, value in HOPE_AUTO_MAP.items()):
        raise HubPublishError(
            f"config.json has auto_map {auto_map}, expected at least {HOPE_AUTO_MAP}: the repository would not load "
            "with trust_remote_code=True"
        )
    return _list_files(folder)


def _create_repo_error(repo_id: str, err: BaseException) -> HubPublishError:
    """A clear message for a failed `create_repo` (the first network call: nothing has been uploaded yet)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403) or "LocalTokenNotFoundError" in names:
        return HubPublishError(
            f"The Hub refused to create {repo_id!r} (not logged in, or the token cannot write there): {err}. "
            "Nothing was uploaded. Log in with `hf auth login` or pass token=."
        )
    if status is not None:
        return HubPublishError(f"The Hub answered HTTP {status} to creating {repo_id!r}: {err}. Nothing was uploaded.")
    if isinstance(err, (ConnectionError, TimeoutError, OSError)) or names & {"TransportError", "TimeoutException"}:
        return HubPublishError(
            f"Could not reach the Hugging Face Hub ({constants.ENDPOINT}) to create {repo_id!r}: {err}. "
            "Nothing was uploaded. Check the network (or HF_ENDPOINT), or use dry_run=True."
        )
    return HubPublishError(f"Creating the Hub repository {repo_id!r} failed: {err!r}. Nothing was uploaded.")


def push_to_hub(
    model,
    repo_id: str,
    *,
    tokenizer=None,
    training: str | Mapping[str, Any] | None = None,
    card: ModelCard | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    save_directory: str | Path | None = None,
    dry_run: bool = False,
    api: HfApi | None = None,
    max_shard_size: str | int | None = None,
    **card_kwargs,
) -> PublishResult:
    """Publish `model` (and `tokenizer`) with its code and model card to the Hub repository `repo_id`.

    The card is `card`, or `hope_hf.cards.build_model_card(model.config, model_name=<repo name>, repo_id=repo_id,
    training=training, **card_kwargs)` (license, datasets, eval_results, tags, summary, intended_use, limitations,
    base_model, language). `save_directory`: where to write the folder (default: a temporary one, removed after the
    upload). `dry_run=True`: write the folder and card and stop (no network; give `save_directory` to keep them).
    `api`: the `HfApi` to use (default `HfApi(token=token)`).
    """
    _check_publish(model, repo_id, dry_run)
    if card is None:
        card_kwargs.setdefault("model_name", repo_id.split("/")[-1])
        card_kwargs.setdefault("repo_id", repo_id)
        card_kwargs["training"] = training
    elif training is not None:
        raise HubPublishError("give card= or training= (and other card fields), not both")

    tmp = None
    if save_directory is not None:
        folder = Path(save_directory)
    elif dry_run:  # kept, for inspection
        folder = Path(tempfile.mkdtemp(prefix="hope-hub-")) / repo_id.split("/")[-1]
    else:  # removed after the upload
        tmp = tempfile.TemporaryDirectory(prefix="hope-hub-")
        folder = Path(tmp.name) / repo_id.split("/")[-1]
    try:
        files = save_for_hub(
            model, folder, tokenizer=tokenizer, card=card, max_shard_size=max_shard_size, **card_kwargs
        )
        result = PublishResult(repo_id=repo_id, folder=folder, files=files, card=ModelCard.load(folder / CARD_FILE))
        if dry_run:
            return result
        _upload(result, api if api is not None else HfApi(token=token), private=private, revision=revision,
                create_pr=create_pr, commit_message=commit_message)
        if tmp is not None:
            result.folder = None  # a temporary folder, removed below
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def _check_publish(model, repo_id: str, dry_run: bool) -> None:
    """Before anything is written: a repository name, a HOPE model, and a Hub to reach unless `dry_run`."""
    if not isinstance(repo_id, str) or not repo_id.strip() or repo_id.count("/") > 1:
        raise HubPublishError(f"repo_id must look like 'name' or 'user/name', got {repo_id!r}")
    _check_model(model)
    if not dry_run and _is_offline():
        raise HubPublishError(
            "The Hugging Face Hub is in offline mode (HF_HUB_OFFLINE=1), so nothing was uploaded to "
            f"{repo_id!r}. Unset HF_HUB_OFFLINE to publish, or pass dry_run=True to write the folder and card only."
        )


def _upload(result: PublishResult, api: HfApi, *, private, revision, create_pr: bool, commit_message) -> None:
    """`create_repo(exist_ok=True)`, then the folder of `result` in one commit; `result` records both."""
    repo_id, folder = result.repo_id, result.folder
    try:
        result.repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except Exception as err:
        raise _create_repo_error(repo_id, err) from err
    try:
        result.commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload HOPE model {repo_id.split('/')[-1]} with hope-hf",
        )
    except Exception as err:
        raise HubPublishError(
            f"Uploading {folder} to {repo_id!r} failed: {err}. A Hub commit is atomic: none of the files of this "
            "upload is in the repository."
        ) from err
    result.uploaded = True
