"""`evaluate` metric modules shipped with hope-hf (loaded offline by path, never from the Hub)."""

from pathlib import Path

__all__ = ["perplexity_metric_path", "load_perplexity_metric"]


def perplexity_metric_path() -> str:
    """Absolute path of the ``hope_perplexity`` metric directory, for ``evaluate.load(path)``."""
    return str(Path(__file__).resolve().parent / "hope_perplexity")


def load_perplexity_metric(**kwargs):
    """``evaluate.load`` of the shipped perplexity metric (no network)."""
    import evaluate

    return evaluate.load(perplexity_metric_path(), **kwargs)
