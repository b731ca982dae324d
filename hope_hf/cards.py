"""Model cards for HOPE models, made with `huggingface_hub`'s `ModelCard` / `ModelCardData` from the template in
`model_cards/template.md`.

* `build_model_card(config, model_name=..., training=...)`: the card of one model: Hub metadata (license,
  `library_name`, tags, datasets, evaluation results as `model-index`), the exact HOPE configuration (layers, CMS levels
  and periods, chunk size, ...), how it was trained, intended use, limitations and the paper citation. `hope-hf train`
  writes the card of the model it trains with it.
* `preset_card(name)`: the card of a preset (`hope_hf.presets`), an untrained configuration.
* `python -m hope_hf.cards [--check] [--output-dir DIR]` writes (or checks) `model_cards/hope-<preset>.md` for every
  preset; `tests/tools/test_hub.py` keeps the checked-in cards equal to what this produces.

Not model code: the modeling files never import this module.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import __version__
from .configuration_hope import RUNTIME_SWITCHES, HopeConfig
from .presets import available_presets, count_parameters, get_preset


__all__ = [
    "DEFAULT_INTENDED_USE",
    "DEFAULT_LIMITATIONS",
    "DEFAULT_TAGS",
    "PAPER_CITATION",
    "build_model_card",
    "card_template_path",
    "config_card_fields",
    "main",
    "preset_card",
    "preset_card_filename",
    "write_preset_cards",
]

PAPER_CITATION = """@article{behrouz2025nested,
  title   = {Nested Learning: The Illusion of Deep Learning Architectures},
  author  = {Behrouz, Ali and Razaviyayn, Meisam and Zhong, Peilin and Mirrokni, Vahab},
  journal = {arXiv preprint arXiv:2512.24695},
  year    = {2025},
  note    = {NeurIPS 2025}
}"""

DEFAULT_TAGS = ["hope", "nested-learning", "titans", "continuum-memory-system", "text-generation", "custom_code"]

DEFAULT_INTENDED_USE = (
    "Research on continual learning, long-context memory and the Nested Learning paradigm: language modelling, "
    "streaming long inputs through the recurrent cache, fine-tuning (full or with PEFT LoRA) and ablations of the "
    "HOPE components. It is a base language model, not an assistant: it continues text and follows no instructions, "
    "and it is not meant for decisions about people or for any use where wrong output causes harm."
)

DEFAULT_LIMITATIONS = "\n".join(
    [
        "- A base language model without instruction tuning or safety alignment: its output can be wrong, biased or "
        "offensive, and reflects its training data.",
        "- Loading with `trust_remote_code=True` runs the Python files of this repository "
        "(`configuration_hope.py`, `modeling_hope.py` and the flat sibling files they import: the memory ops and "
        "the cache); read them first, or pin a `revision`.",
        "- The recurrent cache cannot be rolled back: assisted (speculative) decoding and `cache.crop` are not "
        "available; greedy, sampling and beam search are.",
        "- Self-modifying Titans layers have no position limit; attention layers (where `layer_types` has them) use "
        "RoPE and are limited like any Transformer.",
        "- The memory update departs from the literal equations of the paper where measurements required it "
        "(linear memories by default, an exact delta-rule write of the output memory, one learning rate per "
        "memory, separate key and value streams, retention toward the meta-learned initial state), for in-context "
        "recall and a stable memory on long streams; hope-hf's `docs/paper-mapping.md` lists each with its reason.",
    ]
)

# HopeConfig's own fields, in declaration order: the exact configuration the card prints (library-level fields such
# as `transformers_version` or `dtype` are left out so that a card does not change with the Transformers release).
# what config.json holds: every field but the runtime switches, which describe a machine, not the model
_CONFIG_FIELDS = [name for name in HopeConfig.__annotations__ if name not in RUNTIME_SWITCHES]

_MIXER_NAMES = {
    "linear_attention": "self-modifying Titans",
    "full_attention": "full attention",
    "sliding_attention": "sliding-window attention",
}
_TITANS_SWITCHES = (  # (field, what the default True/False means when it differs from the HOPE default)
    ("self_modifying", True, "static k, v, eta, alpha projections (self_modifying=False)"),
    ("adaptive_k", True, "static keys (adaptive_k=False)"),
    ("adaptive_v", True, "static values (adaptive_v=False)"),
    ("dgd", True, "plain gradient steps, no DGD (dgd=False)"),
    ("retention", True, "no retention gate (retention=False)"),
    ("retain_toward_init", True, "retention toward zero (retain_toward_init=False)"),
    ("detach_self_targets", False, "self-generated targets detached (detach_self_targets=True)"),
)

_PACKAGE_DIR = Path(__file__).resolve().parent
# The template lives in `model_cards/template.md`; `hope_hf/model_card_template.md` is a symlink to it, so that
# wheels carry it as package data. A checkout where the symlink is not materialised falls back to the original.
_TEMPLATE_CANDIDATES = (
    Path(__file__).parent / "model_card_template.md",
    _PACKAGE_DIR.parent / "model_cards" / "template.md",
)
_TEMPLATE_MARKER = "{{ card_data }}"


def card_template_path() -> Path:
    """The model-card template (`model_cards/template.md`, shipped in the package as `model_card_template.md`)."""
    for path in _TEMPLATE_CANDIDATES:
        try:
            if path.is_file() and _TEMPLATE_MARKER in path.read_text(encoding="utf-8"):
                return path
        except OSError:
            continue
    raise FileNotFoundError(
        "The HOPE model-card template was not found; looked for "
        + " and ".join(str(p) for p in _TEMPLATE_CANDIDATES)
        + ". Reinstall hope-hf, or pass template_path= explicitly."
    )


def preset_card_filename(name: str) -> str:
    return f"hope-{name}.md"


def _human(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.{2 if n < 10 * size else 1}f}".rstrip("0").rstrip(".") + unit
    return str(n)


def _period(period: int) -> str:
    if period == 0:
        return "0 (frozen)"
    if period >= 1024 and period & (period - 1) == 0:
        return f"{period:,} (2^{period.bit_length() - 1})"
    return f"{period:,}"


def _layers_text(config: HopeConfig) -> str:
    types = list(config.layer_types)
    counts = {t: types.count(t) for t in dict.fromkeys(types)}
    parts = []
    for t, n in counts.items():
        name = _MIXER_NAMES[t]
        if t == "sliding_attention":
            name += f" (window {config.sliding_window})"
        parts.append(f"{n} x {name}")
    text = f"{len(types)}: " + ", ".join(parts)
    if len(counts) > 1:
        text += " (order in `layer_types`)"
    return text


def config_card_fields(config: HopeConfig) -> dict[str, Any]:
    """What the card says about a configuration: the details table, the CMS levels and the exact config JSON."""
    if not isinstance(config, HopeConfig):
        raise TypeError(f"expected a HopeConfig, got {type(config).__name__}")
    n = count_parameters(config)
    d = config.head_dim
    details = [
        ("parameters", f"{n:,} ({_human(n)}{'; embeddings counted once' if config.tie_word_embeddings else ''})"),
        ("layers", _layers_text(config)),
        ("hidden size", str(config.hidden_size)),
        ("heads x head size", f"{config.num_attention_heads} x {d}"),
    ]
    if not config.is_attention_only:
        deviations = [text for name, default, text in _TITANS_SWITCHES if getattr(config, name) != default]
        details += [
            ("Titans chunk size", f"{config.chunk_size} tokens"),
            ("memory MLP width",
             f"{config.memory_expansion * d} (memory_expansion {config.memory_expansion} x head size)"),
            ("eta_max (inner learning-rate bound)", f"{config.eta_max:g}"),
            ("convolution width (q, u)", str(config.conv_kernel_size)),
            ("Titans variant", "; ".join(deviations) if deviations else "full HOPE (every switch at its default)"),
        ]
    if not all(t == "linear_attention" for t in config.layer_types):
        kv = config.num_key_value_heads
        details.append(
            ("attention", f"RoPE theta {config.rope_theta:g}, {kv} key/value heads, "
             f"max_position_embeddings {config.max_position_embeddings}")
        )
    details += [
        ("CMS", f"{len(config.cms_levels)} levels, {config.cms_variant}"),
        ("vocabulary", f"{config.vocab_size:,}"),
        ("tied embeddings", "yes" if config.tie_word_embeddings else "no"),
    ]
    levels = [
        {"index": i + 1, "period": _period(int(level["period"])), "width": int(level["intermediate_size"])}
        for i, level in enumerate(config.cms_levels)
    ]
    exact = {"model_type": config.model_type}
    exact.update({name: getattr(config, name) for name in _CONFIG_FIELDS})
    return {"details": details, "cms_levels": levels, "config_json": json.dumps(exact, indent=2)}


def _eval_results(results: Sequence[EvalResult | Mapping[str, Any]] | None) -> list[EvalResult]:
    out = []
    for i, result in enumerate(results or []):
        if isinstance(result, EvalResult):
            out.append(result)
        elif isinstance(result, Mapping):
            try:
                out.append(EvalResult(**result))
            except TypeError as err:
                raise ValueError(
                    f"eval_results[{i}] is not a valid huggingface_hub EvalResult ({err}); give at least task_type, "
                    "dataset_type, dataset_name, metric_type and metric_value"
                ) from err
        else:
            raise ValueError(f"eval_results[{i}] must be an EvalResult or a dict, got {type(result).__name__}")
    return out


def _eval_rows(results: Sequence[EvalResult]) -> list[dict[str, Any]]:
    """The rows of the card's evaluation table."""
    return [
        {
            "task": r.task_name or r.task_type,
            "dataset": r.dataset_name if r.dataset_name == r.dataset_type else f"{r.dataset_name} (`{r.dataset_type}`)",
            "split": r.dataset_split or "",
            "metric": r.metric_name or r.metric_type,
            "value": f"{r.metric_value:.4g}" if isinstance(r.metric_value, float) else r.metric_value,
        }
        for r in results
    ]


def _training_text(training: str | Mapping[str, Any] | None) -> str:
    if isinstance(training, Mapping):
        lines = [f"- **{key}**: {value}" for key, value in training.items() if value not in (None, "")]
        text = "\n".join(lines)
    elif isinstance(training, str):
        text = training.strip()
    else:
        text = ""
    if not text:
        raise ValueError(
            "A HOPE model card must say how the model was trained: pass training= as Markdown text or as a dict "
            "(e.g. {'data': ..., 'tokens': ..., 'steps': ..., 'optimizer': ...}); for an untrained model say so."
        )
    return text


def _metrics_table(metrics: Mapping[str, Any] | None) -> str:
    """``metrics`` as a Markdown table (strings as given, so that the caller chooses the precision; floats to 4
    significant digits); empty without metrics."""
    if not metrics:
        return ""
    rows = [f"| {name} | {f'{value:.4g}' if isinstance(value, float) else value} |" for name, value in metrics.items()]
    return "\n".join(["", "", "| metric | value |", "|---|---|", *rows])


def build_model_card(
    config: HopeConfig,
    *,
    model_name: str,
    training: str | Mapping[str, Any],
    training_metrics: Mapping[str, Any] | None = None,
    summary: str | None = None,
    repo_id: str | None = None,
    preset: str | None = None,
    license: str | None = "apache-2.0",
    language: str | list[str] | None = "en",
    datasets: str | list[str] | None = None,
    eval_results: Sequence[EvalResult | Mapping[str, Any]] | None = None,
    base_model: str | list[str] | None = None,
    tags: Sequence[str] | None = None,
    intended_use: str | None = None,
    limitations: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """The model card of a HOPE model with configuration `config`.

    `training` (required): how the model was trained, as Markdown or a dict rendered as a list. `training_metrics`:
    what the training run measured (e.g. train and eval loss), a dict of name -> value shown as a table under
    `training` (string values as given, floats to 4 significant digits); unlike `eval_results` they stay out of the
    metadata. `eval_results`: `huggingface_hub.EvalResult`s or dicts of their fields; they go into the metadata as
    `model-index` and into a table. `repo_id` is used in the loading example (a local folder works too); without it,
    `preset` gives an example that builds the preset. `license=None` leaves the license out of the metadata. `tags`
    are added to `DEFAULT_TAGS`; `limitations` is added to `DEFAULT_LIMITATIONS`.
    """
    if not isinstance(model_name, str) or not model_name.strip():
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    if preset is not None and repo_id is not None:
        raise ValueError("give repo_id (a published model) or preset (an untrained preset), not both")
    results = _eval_results(eval_results)
    card_data = _card_metadata(model_name, license, language, datasets, results, base_model, tags)
    extra_limitations = (limitations or "").strip()
    template_vars = dict(
        model_name=model_name,
        summary=(summary or "").strip() or f"A HOPE language model with {_human(count_parameters(config))} parameters.",
        hope_hf_version=__version__,
        repo_id=repo_id if repo_id is not None else ("" if preset else f"./{model_name}"),
        preset=preset or "",
        training=_training_text(training) + _metrics_table(training_metrics),
        eval_rows=_eval_rows(results),
        intended_use=(intended_use or DEFAULT_INTENDED_USE).strip(),
        limitations=(extra_limitations + "\n" if extra_limitations else "") + DEFAULT_LIMITATIONS,
        citation=PAPER_CITATION,
        **config_card_fields(config),
    )
    path = Path(template_path) if template_path is not None else card_template_path()
    return ModelCard.from_template(card_data, template_path=str(path), **template_vars)


def _card_metadata(model_name: str, license, language, datasets, results: list, base_model, tags) -> ModelCardData:
    """The card's YAML metadata: `DEFAULT_TAGS` and `tags`, the datasets, and the eval results as `model-index`."""
    if isinstance(datasets, str):
        datasets = [datasets]
    return ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *(tags or [])])),
        datasets=list(datasets) if datasets else None,
        base_model=base_model,
        model_name=model_name,
        eval_results=results or None,
    )


def preset_card(name: str) -> ModelCard:
    """The card of preset `name`: an untrained configuration, with the recipe to train it and no results."""
    config = get_preset(name)
    training = (
        f"Untrained: this card describes the `{name}` preset of hope-hf and ships no weights. To train it, "
        f"`hope-hf train --preset {name} --data <text files or a datasets name> --output_dir <dir>` runs the "
        "Transformers `Trainer` with hope-hf's `ContinuumOptimizer`, which steps each CMS level only when its period "
        "(table above) has passed in training tokens, with the gradients summed since its last step (paper Eq. 31). "
        "`HopeTrainer` does the same from Python, and `accelerate launch` scales it to several GPUs (DDP or FSDP2)."
    )
    limitations = (
        "- This is a configuration, not a trained model: a model built from it generates random text until it is "
        "trained."
    )
    return build_model_card(
        config,
        model_name=f"hope-{name}",
        preset=name,
        summary=f"The `{name}` preset of hope-hf: the HOPE architecture at {_human(count_parameters(config))} "
        "parameters, untrained.",
        training=training,
        limitations=limitations,
    )


def _default_output_dir() -> Path:
    folder = _PACKAGE_DIR.parent / "model_cards"
    if not (folder / "template.md").is_file():
        raise FileNotFoundError(
            f"{folder} is not a hope-hf checkout's model_cards/ folder; pass --output-dir (or output_dir=)"
        )
    return folder


def write_preset_cards(output_dir: str | Path | None = None, check: bool = False) -> list[Path]:
    """Write the card of every preset to `output_dir` (default: the checkout's `model_cards/`).

    With `check=True` nothing is written; returns the cards that are missing or differ from what would be written
    (an empty list means up to date).
    """
    folder = Path(output_dir) if output_dir is not None else _default_output_dir()
    changed = []
    for name in available_presets():
        path = folder / preset_card_filename(name)
        text = str(preset_card(name))
        if not text.endswith("\n"):
            text += "\n"
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            changed.append(path)
            if not check:
                folder.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hope_hf.cards", description="Write the model card of every hope-hf preset."
    )
    parser.add_argument(
        "--output-dir", default=None, help="folder for the cards (default: the checkout's model_cards/)"
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a card is missing or stale")
    args = parser.parse_args(argv)
    changed = write_preset_cards(args.output_dir, check=args.check)
    if args.check:
        for path in changed:
            print(f"stale or missing: {path} (run `python -m hope_hf.cards`)", file=sys.stderr)
        return 1 if changed else 0
    for path in changed:
        print(f"wrote {path}")
    if not changed:
        print("all preset cards are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
