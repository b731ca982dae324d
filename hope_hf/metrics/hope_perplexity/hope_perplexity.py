"""Perplexity from summed negative log-likelihoods, as an `evaluate` metric module that loads offline by path.

Unlike the Hub's ``perplexity`` metric this one runs no model and downloads nothing: the caller gives, per evaluated
sequence (or batch), the summed next-token negative log-likelihood in nats and the number of predicted tokens.

    >>> import evaluate
    >>> from hope_hf.metrics import perplexity_metric_path
    >>> metric = evaluate.load(perplexity_metric_path())
    >>> metric.compute(nll_sum=[2.0, 4.0], num_tokens=[2, 2])["perplexity"]  # exp(6 / 4)
    4.4816890703380645
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Token-level perplexity exp(sum NLL / sum tokens) from per-sequence summed NLLs (nats) and token counts."
_KWARGS_DESCRIPTION = """
Args:
    nll_sum (`list[float]`): summed next-token negative log-likelihood (natural log) of each sequence or batch.
    num_tokens (`list[int]`): number of predicted tokens behind each `nll_sum`.
Returns:
    perplexity (`float`): exp(sum(nll_sum) / sum(num_tokens)).
    mean_nll (`float`): sum(nll_sum) / sum(num_tokens), the cross-entropy in nats per token.
    bits_per_token (`float`): mean_nll / ln 2.
    num_tokens (`int`): sum(num_tokens).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HopePerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum, num_tokens):
        total_tokens = int(sum(num_tokens))
        if total_tokens <= 0:
            raise ValueError("hope_perplexity: num_tokens sums to 0, there is nothing to score")
        if any(n < 0 for n in num_tokens):
            raise ValueError("hope_perplexity: num_tokens must be >= 0")
        mean_nll = float(sum(nll_sum)) / total_tokens
        return {
            "perplexity": math.exp(mean_nll),
            "mean_nll": mean_nll,
            "bits_per_token": mean_nll / math.log(2),
            "num_tokens": total_tokens,
        }
